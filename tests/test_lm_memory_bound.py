"""Per-token labeling (top-64) and its conversion to draws (the sampler's softmax over V) of a 200,000-id vocabulary
are bounded by a chunk of positions x V, not by the shard: the peak memory of a subprocess above its loaded
teacher is asserted (docs/design.md, "Memory")."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests import lm_fixtures as lf
from tests.helpers import REPO_ROOT, subprocess_env

VOCAB, SEQ_LEN, BATCH = 200_000, 64, 8

_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from kdstore.convert import ConvertConfig, convert
    from kdstore.lm_labeling import LMLabelConfig, label_lm
    from kdstore.lm_teachers import load_lm_teacher

    def status(key):
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key + ":"))
        return int(line.split()[1]) / 1024

    load_lm_teacher("tests.lm_fixtures:llama_200k")  # imports and the model: the baseline
    loaded = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here
    res = label_lm(LMLabelConfig(teacher="tests.lm_fixtures:llama_200k", transfer=sys.argv[1], out=sys.argv[2],
                                 name="wide", seq_len=64, top_k=64, batch_size=8, shard_rows=64))
    label_peak = status("VmHWM")
    conv = convert(ConvertConfig(str(res.path), top_k=0, sample=16, name="drawn"))
    print(json.dumps({"loaded_mb": loaded, "label_peak_mb": label_peak, "peak_mb": status("VmHWM"),
                      "positions": res.manifest["num_rows"] * 64,
                      "chunk": res.manifest["labeling"]["positions_per_chunk"],
                      "drawn": conv.manifest["targets"]["sampled"]["draws"]}))
""")


def test_a_200k_vocabulary_is_labeled_and_converted_in_memory_bounded_by_a_chunk(tmp_path: Path) -> None:
    corpus = tmp_path / "news.txt"
    corpus.write_text("\n".join(lf.TEXT * 8) + "\n")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(corpus), str(tmp_path / "store")], env=subprocess_env(),
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    chunk_mb = BATCH * out["chunk"] * VOCAB * 4 / 2**20  # 61 MB: 10 positions of a batch of 8
    shard_mb = out["positions"] * VOCAB * 4 / 2**20  # the shard's logits: ~1.2 GB
    assert out["chunk"] == 10 and out["positions"] >= 1400 and out["drawn"] == 16
    # a chunk of logits, the scratch buffer, the sampler's softmax and a few chunk-sized temporaries; never the shard
    assert out["peak_mb"] - out["loaded_mb"] < 6 * chunk_mb + 100 < shard_mb / 2, out
