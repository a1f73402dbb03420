"""Per-token targets as torch data (#17 item 4): the Dataset and collator, docs/lm.md's Hugging Face `Trainer`
example run as written, and the axolotl export read back the way axolotl's KD plugin reads it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdstore.errors import ConfigError, ShapeMismatchError
from kdstore.lm_data import TokenTargetDataset, collate, stream_batches
from kdstore.lm_export import AXOLOTL_COLUMNS, export_axolotl, topk_logprobs
from kdstore.lm_losses import IGNORE, lm_kd_loss, next_token_labels, topk_teacher_logprobs
from kdstore.store import Version
from tests import lm_fixtures as lf
from tests.helpers import REPO_ROOT, cli

TEACHER = "tests.lm_fixtures:sharp_bigram"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("lm_data")
    corpus = d / "news.txt"
    corpus.write_text("\n".join(lf.TEXT * 2) + "\n", "utf-8")
    r = cli(["label", "--teacher", TEACHER, "--transfer", corpus, "--out", d / "s", "--name", "news", "--seq-len",
             "16", "--top-k", "8", "--sample", "12", "--shard-rows", "10", "--row-group-rows", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    chats = d / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "Hi there"}, '
                     '{"role": "assistant", "content": "Hello! How are you?"}]}\n', "utf-8")
    r = cli(["label", "--teacher", TEACHER, "--transfer", chats, "--out", d / "s", "--name", "chat", "--seq-len",
             "48", "--top-k", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    return d / "s"


def test_collate_shapes_masks_and_padded_draws(store: Path) -> None:
    v = Version(store / "news")
    ds = TokenTargetDataset(v, "sampled")
    items = [ds[i] for i in range(3)]
    b = collate(items)
    L = v.manifest["targets"]["seq_len"]
    assert b["input_ids"].shape == (3, L) and b["labels"].dtype == torch.int64
    assert torch.equal(b["labels"], next_token_labels(b["input_ids"], b["loss_mask"], b["attention_mask"]))
    assert (b["labels"][:, -1] == IGNORE).all()
    K = b["sample_ids"].shape[-1]
    lengths = torch.from_numpy(np.stack([it["sample_lengths"] for it in items]).astype(np.int64))
    assert int(lengths.max()) == K and b["sample_counts"].shape == (3, L, K)
    filled = torch.arange(K) < lengths[..., None]
    assert (b["sample_ids"][~filled] == -1).all() and (b["sample_counts"][~filled] == 0).all()
    assert torch.isneginf(b["sample_logprobs"][~filled]).all()
    assert (b["sample_counts"].sum(-1) == v.manifest["targets"]["sampled"]["draws"]).all()  # every position drawn
    cells = v.read_all(["t0_sample_ids"])["t0_sample_ids"].cells()
    assert b["sample_ids"][1, 5, : lengths[1, 5]].tolist() == cells[L + 5].tolist()


def test_smaller_k_moves_the_rest_into_the_tail(store: Path) -> None:
    v = Version(store / "news")
    full, cut = collate([TokenTargetDataset(v, "topk")[0]]), collate([TokenTargetDataset(v, "topk", k=3)[0]])
    assert cut["topk_values"].shape[-1] == 3 and torch.equal(cut["topk_indices"], full["topk_indices"][..., :3])
    want = torch.logaddexp(full["tail_logmass"],
                           torch.logsumexp(full["topk_values"][..., 3:] - full["logsumexp"][..., None], -1))
    torch.testing.assert_close(cut["tail_logmass"], want)
    with pytest.raises(ConfigError, match=r"top_k 9: must be in \[1, 8\]"):
        TokenTargetDataset(v, "topk", k=9)


def test_chat_masks_count_only_the_assistant(store: Path) -> None:
    b = collate([TokenTargetDataset(Version(store / "chat"), "topk")[0]])
    counted = b["labels"] != IGNORE
    assert 0 < int(counted.sum()) < int(b["attention_mask"].sum()) - 1
    assert torch.equal(counted[:, :-1], b["target_mask"][:, :-1].bool())  # target t <=> token t + 1 counted
    logits = torch.randn(1, b["input_ids"].shape[1], 512)
    base = lm_kd_loss(logits, b, loss="topk", temperature=1.0, alpha=0.5)
    noisy = logits.clone()
    noisy[~b["target_mask"].bool() & ~counted] = 1e4  # positions that count for nothing change nothing
    assert lm_kd_loss(noisy, b, loss="topk", temperature=1.0, alpha=0.5) == base


def test_data_errors(store: Path) -> None:
    v = Version(store / "news")
    with pytest.raises(ConfigError, match="stores no sample_ids"):
        TokenTargetDataset(Version(store / "chat"), "sampled")
    with pytest.raises(ConfigError, match="targets .logits.: expected one of topk, sampled, none"):
        TokenTargetDataset(v, "logits")
    with pytest.raises(ConfigError, match="collate: an empty batch"):
        collate([])
    with pytest.raises(ConfigError, match="batch_size 0: must be >= 1"):
        next(stream_batches(v, "topk", 0, seed=0, epoch=0))
    with pytest.raises(ShapeMismatchError, match="must be \\(B, L, V\\)"):
        lm_kd_loss(torch.zeros(4, 512), collate([TokenTargetDataset(v, "topk")[0]]), loss="topk", temperature=1.0,
                   alpha=1.0)


def test_classification_version_is_refused(data: Any, tmp_path: Path) -> None:
    from tests.helpers import run_label

    path = run_label(data.teacher_pt, data.parquet, tmp_path, "digits").path
    with pytest.raises(ConfigError, match="holds classification targets, not per-token targets"):
        TokenTargetDataset(Version(path), "topk")


# -------------------------------------------------------------------------------------------- docs/lm.md example
def _doc_block(name: str) -> str:
    text = (REPO_ROOT / "docs" / "lm.md").read_text("utf-8")
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        if block.startswith(f"# doc-test: {name}\n"):
            return block
    raise AssertionError(f"docs/lm.md has no block '# doc-test: {name}'")


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator")  # CPU-only CI
def test_hugging_face_trainer_example_runs_and_distills(store: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    code, n = re.subn(r'^version = open_version\(".*"\)', f"version = open_version({str(store / 'news')!r})",
                      _doc_block("hf-trainer"), flags=re.M)
    assert n == 1
    monkeypatch.chdir(tmp_path)  # the example writes runs/hf-kd
    ns: dict[str, Any] = {"__name__": "lm_doc_example"}
    exec(compile(code, "docs/lm.md:hf-trainer", "exec"), ns)
    student, train = ns["student"], ns["train"]
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    fresh = LlamaForCausalLM(student.config)
    batch = collate([train[i] for i in range(len(train))])

    def loss(model: torch.nn.Module) -> float:  # the example's objective on every row
        with torch.no_grad():
            return float(lm_kd_loss(model.eval()(input_ids=batch["input_ids"]).logits, batch, loss="topk",
                                    temperature=2.0, alpha=0.5))

    assert loss(student) < 0.9 * loss(fresh)


# ------------------------------------------------------------------------------------------------ axolotl export
def _axolotl_collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The KD fields as axolotl's `DataCollatorForKD` pads them (integrations/kd/collator.py): per position the
    top-k lists padded to the batch's largest k with log-prob -1e9, id 0 and mask 0; the rest as tensors."""
    max_k = max(len(pos) for f in features for pos in f["target_logprobs"])
    out: dict[str, list[Any]] = {c: [] for c in AXOLOTL_COLUMNS}
    for f in features:
        for c in ("input_ids", "attention_mask", "labels"):
            out[c].append(f[c])
        pads = (("target_logprobs", -1e9), ("target_token_ids", 0), ("target_mask", 0))
        for c, pad in pads:
            out[c].append([list(x) + [pad] * (max_k - len(x)) for x in f[c]])
    dtypes = {"target_logprobs": torch.float}
    return {c: torch.tensor(v, dtype=dtypes.get(c, torch.long)) for c, v in out.items()}


def _axolotl_forward_kl(student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                        mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """axolotl's top-k forward KL (integrations/kd/topk_logprob/forward_kl.py `loss`, beta 0, no top-k
    renormalisation): student logits at position p against the targets at p, summed over the valid entries and
    divided by their number."""
    s = student_logits[:, : ids.shape[1]].float() / temperature
    s_top = torch.gather(s, -1, ids) - torch.logsumexp(s, -1, keepdim=True)
    valid = mask.bool()
    per = logprobs[valid].exp() * (logprobs[valid] - s_top[valid])
    return per.sum() / per.numel()


def test_axolotl_export_reads_back_as_the_plugin_reads_it(store: Path, tmp_path: Path) -> None:
    from datasets import load_dataset

    v = Version(store / "news")
    out = tmp_path / "kd" / "news.parquet"
    assert export_axolotl(v, out) == v.num_rows
    rows = load_dataset("parquet", data_files=str(out), split="train")
    assert rows.column_names == list(AXOLOTL_COLUMNS) and len(rows) == v.num_rows
    ax = _axolotl_collate([rows[i] for i in range(len(rows))])
    ours = collate([TokenTargetDataset(v, "topk")[i] for i in range(v.num_rows)])
    assert torch.equal(ax["input_ids"], ours["input_ids"]) and torch.equal(ax["target_token_ids"],
                                                                            ours["topk_indices"])
    # the plugin's CE term shifts the labels by one (kernels/liger.py): that is kdstore's next-token labels
    shifted = torch.nn.functional.pad(ax["labels"], (0, 1), value=IGNORE)[:, 1:]
    assert torch.equal(shifted, ours["labels"])
    assert torch.equal(ax["target_mask"][..., 0], ours["target_mask"].long())
    # its KD term on the exported columns equals the KL-to-top-k computed from kdstore's columns
    logits = torch.randn(*ours["input_ids"].shape, v.num_classes, generator=torch.Generator().manual_seed(0))
    for t in (1.0, 2.0):
        exported = export_axolotl(v, tmp_path / f"t{t:g}.parquet", temperature=t)
        assert exported == v.num_rows
        back = _axolotl_collate(list(load_dataset("parquet", data_files=str(tmp_path / f"t{t:g}.parquet"),
                                                  split="train")))
        log_q, _ = topk_teacher_logprobs(ours["topk_values"], ours["logsumexp"], ours["tail_logmass"],
                                         v.num_classes, t)
        torch.testing.assert_close(back["target_logprobs"], log_q, atol=2e-6, rtol=0)
        s = torch.log_softmax(logits / t, -1).gather(-1, ours["topk_indices"])
        tm = ours["target_mask"].bool()
        want = (log_q.exp() * (log_q - s))[tm].sum() / (tm.sum() * log_q.shape[-1])
        got = _axolotl_forward_kl(logits, back["target_token_ids"], back["target_logprobs"], back["target_mask"], t)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_topk_logprobs_at_t1_are_values_minus_logsumexp() -> None:
    g = np.random.default_rng(0)
    z = g.normal(size=(5, 50)) * 3
    top = np.sort(z, -1)[:, ::-1][:, :6]
    lse = np.log(np.exp(z).sum(-1))
    tail = np.log(np.exp(np.sort(z, -1)[:, :-6]).sum(-1)) - lse
    np.testing.assert_allclose(topk_logprobs(top, lse, tail, 50), top - lse[:, None], atol=1e-6)
    with pytest.raises(ConfigError, match="temperature"):
        topk_logprobs(top, lse, tail, 50, temperature=0.0)


def test_export_needs_a_top_k(store: Path, tmp_path: Path) -> None:
    r = cli(["convert", store / "news", "--top-k", "0", "--name", "drawn", "--quiet"])  # the draws alone
    assert r.exit_code == 0, r.output
    with pytest.raises(ConfigError, match=r"stores no topk_indices \(12 draws stored\)"):
        export_axolotl(Version(store / "drawn"), tmp_path / "x.parquet")
    assert not list(tmp_path.iterdir())
