"""Training language-model students from stored per-token targets (#17): `kdstore train` on a per-token version
(top-k, sampled and hard losses, held-out metrics, run directory, resume, streaming), students and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdstore.errors import StudentError
from kdstore.lm_data import TokenTargetDataset, collate, stream_batches
from kdstore.lm_students import GPT, build_lm_student
from kdstore.lm_training import LMTrainConfig, LMTrainer
from kdstore.store import Version
from tests import lm_fixtures as lf
from tests.helpers import assert_clean_error, cli

LABEL = ["--seq-len", "16", "--top-k", "8", "--sample", "12", "--batch-size", "4", "--shard-rows", "10",
         "--row-group-rows", "3", "--quiet"]
TEACHER = "tests.lm_fixtures:sharp_bigram"  # peaked targets: KD visibly moves a student toward them
TRAIN = ["--student", "gpt:1-16-2", "--epochs", "2", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("lm_train")
    corpus = d / "news.txt"
    corpus.write_text("\n".join(lf.TEXT * 3) + "\n", "utf-8")
    r = cli(["label", "--teacher", TEACHER, "--transfer", corpus, "--out", d / "s", "--name", "news",
             *LABEL])
    assert r.exit_code == 0, r.output
    held = d / "held.txt"
    held.write_text("\n".join(reversed(lf.TEXT)) + "\n", "utf-8")
    r = cli(["label", "--teacher", TEACHER, "--transfer", held, "--out", d / "s", "--name", "held",
             "--seq-len", "16", "--top-k", "8", "--quiet"])
    assert r.exit_code == 0, r.output
    r = cli(["convert", d / "s" / "held", "--top-k", "0", "--sample", "6", "--name", "drawn", "--quiet"])
    assert r.exit_code == 0, r.output
    return d / "s"


def test_train_topk_sampled_hard_writes_a_run(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = cli(["train", "--targets", store / "news", "--loss", "topk,sampled,hard", "-T", "2", "--alpha", "0.5",
             "--val-fraction", "0.25", "--eval", store / "held", "--out", out, *TRAIN])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:5] == ["run", "T", "alpha", "val", "ppl"]
    assert [ln.split()[0].lstrip("*") for ln in lines[1:4]] == ["topk-T2-a0.5", "sampled-T2-a0.5", "hard"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "tokens" and len(summary["runs"]) == 3
    config = json.loads((out / "config.json").read_text())  # --device auto: CUDA + bf16 when present
    assert (config["device"], config["precision"]) == (("cuda", "bf16") if torch.cuda.is_available() else
                                                       ("cpu", "fp32"))
    assert summary["validation"]["held_out"]["rows"] > 0 and summary["validation"]["eval"].endswith("held@v1")
    v = Version(store / "news")
    from kdstore.lm_data import holdout_rows

    real_tokens = int(v.read_all(["attention_mask"])["attention_mask"][~holdout_rows(v, 0.25)].sum())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["run"], m["epoch"]) for m in metrics][:2] == [("topk-T2-a0.5", 1), ("topk-T2-a0.5", 2)]
    for run in ("topk-T2-a0.5", "sampled-T2-a0.5", "hard"):
        res = json.loads((out / "runs" / run / "result.json").read_text())
        e = res["extra"]
        assert res["val_nll"] > 0 and e["val_kl_teacher"] > 0 and e["eval_perplexity"] > 1
        assert e["train_tokens"] == 2 * real_tokens  # two epochs of the training rows' real tokens
        # the saved student reproduces the held-out NLL it was scored with
        info = json.loads((out / "runs" / run / "student.json").read_text())
        model = build_lm_student(info["student"], info["vocab_size"], info["seq_len"])
        model.load_state_dict(load_file(str(out / "runs" / run / "student.safetensors")))
        trainer = LMTrainer(LMTrainConfig(targets=str(store / "news"), student="gpt:1-16-2", out=str(tmp_path / "x"),
                                          val_fraction=0.25))
        assert trainer.measure(model, "val")["nll"] == pytest.approx(res["val_nll"], rel=1e-5)
    # a resumed finished run trains nothing and prints the same table
    r2 = cli(["train", "--targets", store / "news", "--loss", "topk,sampled,hard", "-T", "2", "--alpha", "0.5",
              "--val-fraction", "0.25", "--eval", store / "held", "--out", out, "--resume", *TRAIN])
    assert r2.exit_code == 0 and r2.output == r.output


def test_seed_sweep_reports_mean_and_sd_and_plots(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    r = cli(["train", "--targets", store / "news", "--loss", "topk,hard", "-T", "1,2", "--seed", "0,1",
             "--val-fraction", "0.25", "--out", out, "--student", "gpt:1-16-2", "--epochs", "1", "--batch-size", "8",
             "--quiet"])
    assert r.exit_code == 0, r.output
    assert "mean +- SD over seeds:" in r.output
    line = next(ln for ln in r.output.splitlines() if ln.strip().startswith("topk-T2-a1 "))
    assert "seeds 0,1: val ppl" in line and "+-" in line and "tok/s" in line
    assert (out / "sweep.png").stat().st_size > 0 and "sweep.png" in r.output.splitlines()[-1]
    groups = json.loads((out / "summary.json").read_text())["over_seeds"]
    assert [g["run"] for g in groups] == ["topk-T1-a1", "topk-T2-a1", "hard"]
    runs = [json.loads((out / "runs" / f"topk-T2-a1-s{s}" / "result.json").read_text()) for s in (0, 1)]
    assert groups[1]["val_perplexity_mean"] == pytest.approx(np.mean([x["extra"]["val_perplexity"] for x in runs]))


def test_kd_moves_the_student_toward_the_teacher(store: Path, tmp_path: Path) -> None:
    """Distilling (alpha 1) lowers the held-out KL to the teacher below the untrained student's."""
    cfg = LMTrainConfig(targets=str(store / "news"), student="gpt:1-16-2", out=str(tmp_path / "r"), epochs=8,
                        batch_size=4, lr=1e-2, val_fraction=0.25, losses=("topk", "sampled", "rkl", "jsd"))
    trainer = LMTrainer(cfg)
    torch.manual_seed(0)
    before = trainer.measure(build_lm_student("gpt:1-16-2", 512, 16), "val")["kl_teacher"]
    results = trainer.run()
    for res in results:
        assert res.extra["val_kl_teacher"] < 0.7 * before, (res.run, before, res.extra["val_kl_teacher"])


def test_reverse_kl_and_jsd_sweep_through_the_cli(store: Path, tmp_path: Path) -> None:
    """--loss rkl,jsd (with --jsd-beta) trains one student per loss and temperature from the stored top-k."""
    out = tmp_path / "div"
    r = cli(["train", "--targets", store / "news", "--loss", "rkl,jsd", "--jsd-beta", "0.3", "-T", "1,2",
             "--top-k", "4", "--val-fraction", "0.25", "--out", out, *TRAIN])
    assert r.exit_code == 0, r.output
    runs = ["rkl-T1-a1", "rkl-T2-a1", "jsd-T1-a1", "jsd-T2-a1"]
    assert [ln.split()[0].lstrip("*") for ln in r.output.splitlines()[1:5]] == runs
    for run in runs:
        res = json.loads((out / "runs" / run / "result.json").read_text())
        assert np.isfinite(res["val_nll"]) and res["extra"]["val_kl_teacher"] > 0
        info = json.loads((out / "runs" / run / "student.json").read_text())
        assert info["loss"] == run[:3] and info.get("jsd_beta") == (0.3 if run.startswith("jsd") else None)
    assert json.loads((out / "config.json").read_text())["config"]["jsd_beta"] == 0.3
    losses = [json.loads(x)["train_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= x < 100 for x in losses)


def test_reverse_kl_and_jsd_option_errors(store: Path, tmp_path: Path, data: object) -> None:
    r = cli(["train", "--targets", store / "drawn", "--loss", "rkl", "--out", tmp_path / "o", *TRAIN])
    assert_clean_error(r, r"--loss rkl: needs the stored top-k .* stores sampled draws only; use --loss sampled")
    r = cli(["train", "--targets", store / "news", "--loss", "jsd", "--jsd-beta", "1", "--out", tmp_path / "o",
             *TRAIN])
    assert_clean_error(r, r"--jsd-beta 1: must be in \(0, 1\)")
    r = cli(["train", "--targets", store / "news", "--loss", "topk,hard", "--jsd-beta", "0.3", "--out",
             tmp_path / "o", *TRAIN])
    assert_clean_error(r, "--jsd-beta 0.3: only used by --loss jsd, and the losses are topk,hard")
    from tests.helpers import run_label

    digits = run_label(data.teacher_pt, data.parquet, tmp_path / "c", "digits").path  # type: ignore[attr-defined]
    r = cli(["train", "--targets", digits, "--student", "mlp:8-16-5", "--loss", "rkl", "--out", tmp_path / "o",
             "--quiet"])
    assert_clean_error(r, "--loss 'rkl': expected one of kd, topk, mse, hard, ls \\(it is for per-token targets")
    r = cli(["train", "--targets", digits, "--student", "mlp:8-16-5", "--loss", "kd", "--jsd-beta", "0.5", "--out",
             tmp_path / "o", "--quiet"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "Error: --jsd-beta: only for --loss jsd on per-token targets" in r.output
    assert not (tmp_path / "o").exists()


def test_resume_continues_from_the_last_epoch_bit_for_bit(store: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = dict(targets=str(store / "news"), student="gpt:1-16-2", epochs=3, batch_size=8, val_fraction=0.25,
               losses=("sampled",), temperatures=(2.0,))
    whole = LMTrainer(LMTrainConfig(out=str(tmp_path / "whole"), **cfg)).run()[0]
    lf.interrupt_in_epoch_2(monkeypatch, lambda: LMTrainer(LMTrainConfig(out=str(tmp_path / "cut"), **cfg)).run())
    assert (tmp_path / "cut" / "runs" / "sampled-T2-a1" / "checkpoint.pt").exists()
    resumed = LMTrainer(LMTrainConfig(out=str(tmp_path / "cut"), **cfg)).run(resume=True)[0]
    assert resumed.val_nll == whole.val_nll
    a = load_file(str(tmp_path / "whole" / "runs" / "sampled-T2-a1" / "student.safetensors"))
    b = load_file(str(tmp_path / "cut" / "runs" / "sampled-T2-a1" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_streaming_reads_each_training_row_once_per_epoch(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v = Version(store / "news")
    reads: list[list[int] | None] = []
    real = Version.read_file

    def spy(self: Version, index: int, names: list[str], row_groups: list[int] | None = None, **kw: object) -> object:
        reads.append(None if row_groups is None else list(row_groups))
        return real(self, index, names, row_groups, **kw)

    monkeypatch.setattr(Version, "read_file", spy)
    list(stream_batches(v, "topk", 5, seed=0, epoch=0))
    assert reads and all(r is not None and len(r) == 1 for r in reads)  # one row group at a time: flat memory
    assert len(reads) == sum(len(v.row_groups(i)) for i in range(len(v.files)))
    monkeypatch.setattr(Version, "read_file", real)
    keep = np.ones(v.num_rows, bool)
    keep[::4] = False
    batches = list(stream_batches(v, "sampled", 5, seed=1, epoch=0, keep=keep))
    mem = TokenTargetDataset(v, "sampled", rows=np.flatnonzero(keep))
    ids = torch.cat([b["input_ids"] for b in batches])
    assert len(ids) == keep.sum() and all(len(b["input_ids"]) == 5 for b in batches[:-1])
    want = collate([mem[i] for i in range(len(mem))])["input_ids"]
    assert sorted(map(tuple, ids.tolist())) == sorted(map(tuple, want.tolist()))
    order2 = torch.cat([b["input_ids"] for b in stream_batches(v, "sampled", 5, seed=1, epoch=1, keep=keep)])
    assert not torch.equal(ids, order2)  # another epoch, another order


def test_stream_and_memory_train(store: Path, tmp_path: Path) -> None:
    r = cli(["train", "--targets", store / "news", "--loss", "topk", "--top-k", "4", "--data", "stream",
             "--out", tmp_path / "s", *TRAIN])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s" / "config.json").read_text())["mode"] == "stream"
    assert not (tmp_path / "s" / "sweep.png").exists()  # one run: nothing to plot


def small_vocab() -> nn.Module:
    return GPT(100, 16, 1, 8, 2)


def short_context() -> nn.Module:
    return GPT(512, 8, 1, 8, 2)


@pytest.mark.parametrize(("student", "match"), [
    ("tests.test_lm_train:small_vocab", "its vocabulary has 100 ids, the stored targets 512"),
    ("tests.test_lm_train:short_context", "context is 8 tokens, shorter than the stored sequences of 16"),
    ("gpt:1-30-4", "DIM a multiple of HEADS"),
    ("mlp:16-512", "a classification student"),
    ("nope:x:y", "is not understood"),
])
def test_student_errors_are_one_line(store: Path, tmp_path: Path, student: str, match: str) -> None:
    r = cli(["train", "--targets", store / "news", "--student", student, "--out", tmp_path / "o", "--quiet"])
    assert_clean_error(r, match)
    assert not (tmp_path / "o").exists()


def test_hf_config_student(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=32).save_pretrained(tmp_path)
    model = build_lm_student(f"hf:{tmp_path}", 512, 16)
    assert model(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 512)
    with pytest.raises(StudentError, match="its vocabulary has 512 ids, the stored targets 600"):
        build_lm_student(f"hf:{tmp_path}", 600, 16)
    with pytest.raises(StudentError, match="context is 32 tokens"):
        build_lm_student(f"hf:{tmp_path}", 512, 64)


def test_hf_model_directory_student_and_its_errors(tmp_path: Path) -> None:
    """`hf:DIR` with weights is that model (the fixture teacher's Llama, 512 ids); without config.json, refused."""
    model = build_lm_student(f"hf:{lf.hf_dir()}", 512, 16)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(lf.hf_dir())
    ids = torch.tensor([[5, 9, 2, 7]])
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    with pytest.raises(StudentError, match=r"student hf:.*: no config.json in"):
        build_lm_student(f"hf:{tmp_path}", 512, 16)
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(StudentError, match="transformers cannot build it"):
        build_lm_student(f"hf:{tmp_path}", 512, 16)


def broken_forward() -> nn.Module:
    return nn.Linear(3, 3)  # ids (B, L) are not float features


def wrong_shape() -> nn.Module:
    class Flat(nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(ids.shape[0], 512)

    return Flat()


def test_factory_students_that_are_not_language_models() -> None:
    with pytest.raises(StudentError, match=r"forward failed on token ids of shape \(1, 2\)"):
        build_lm_student("tests.test_lm_train:broken_forward", 512, 16)
    with pytest.raises(StudentError, match=r"maps ids \(1, 2\) to \(1, 512\); expected logits"):
        build_lm_student("tests.test_lm_train:wrong_shape", 512, 16)


def test_bf16_autocast_trains_on_the_cpu(store: Path, tmp_path: Path) -> None:
    """--precision bf16 (what --device auto picks on CUDA) runs the student in bf16 and the losses in float32."""
    cfg = LMTrainConfig(targets=str(store / "news"), student="gpt:1-16-2", out=str(tmp_path / "b"), epochs=1,
                        batch_size=8, precision="bf16", device="cpu", val_fraction=0.25, losses=("topk", "sampled"))
    trainer = LMTrainer(cfg)
    assert trainer.precision == "bf16"
    for res in trainer.run():
        assert np.isfinite(res.val_nll) and np.isfinite(res.extra["val_kl_teacher"])


def test_option_errors(store: Path, tmp_path: Path) -> None:
    r = cli(["train", "--targets", store / "held", "--loss", "sampled", "--out", tmp_path / "o", *TRAIN])
    assert_clean_error(r, r"stores no sample_ids \(top-8 stored\).*use --loss topk")
    r = cli(["train", "--targets", store / "drawn", "--loss", "topk", "--out", tmp_path / "o", *TRAIN])
    assert_clean_error(r, r"stores no topk_indices \(6 draws stored\).*use --loss sampled")
    r = cli(["train", "--targets", store / "news", "--loss", "kd", "--out", tmp_path / "o", *TRAIN])
    assert_clean_error(r, "--loss 'kd': per-token targets train with topk, sampled, hard")
    r = cli(["train", "--targets", store / "news", "--top-k", "9", "--out", tmp_path / "o", *TRAIN])
    assert_clean_error(r, "--top-k 9: .* stores top-8")
    r = cli(["train", "--targets", store / "news", "--standardize", "on", "--smoothing", "0.2", "--out",
             tmp_path / "o", *TRAIN])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "Error: --standardize, --smoothing: not used with per-token targets" in r.output
    assert not (tmp_path / "o").exists()
    r = cli(["train", "--targets", store / "news", "--agreement", "final", "--eval-every", "2", "--out",
             tmp_path / "o", *TRAIN])  # classification-only cadence and agreement: refused, never ignored
    assert r.exit_code == 2 and "Error: --eval-every, --agreement: not used with per-token targets" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_torchrun_ddp_matches_one_process(store: Path, tmp_path: Path, mode: str) -> None:
    """2 gloo processes split every global batch: the same sequences per step as 1 process, so (up to the weighting
    of the ranks' per-token means by sequences) the same student; rank 0 alone writes and prints."""
    from tests.test_distributed import _torchrun

    args = ["train", "--targets", store / "news", "--loss", "topk", "-T", "2", "--val-fraction", "0.25",
            "--device", "cpu", "--data", mode, *TRAIN]
    one = cli([*args, "--out", tmp_path / "one"])
    assert one.exit_code == 0, one.output
    p = _torchrun(2, [*args, "--out", tmp_path / "two"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("topk-T2-a1") == 1
    r1, r2 = (json.loads((tmp_path / d / "runs" / "topk-T2-a1" / "result.json").read_text()) for d in ("one", "two"))
    assert r2["extra"]["world_size"] == 2 and r2["extra"]["train_tokens"] == r1["extra"]["train_tokens"]
    assert r2["val_nll"] == pytest.approx(r1["val_nll"], rel=1e-3)
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2  # epochs, rank 0 only


def test_eval_version_must_match_the_teacher(store: Path, tmp_path: Path, data: object) -> None:
    corpus = tmp_path / "other.txt"
    corpus.write_text("\n".join(lf.TEXT[:3]) + "\n", "utf-8")
    r = cli(["label", "--teacher", "tests.lm_fixtures:bigram_teacher", "--transfer", corpus, "--out", tmp_path / "s",
             "--name", "other", "--seq-len", "16", "--top-k", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    r = cli(["train", "--targets", store / "news", "--eval", tmp_path / "s" / "other", "--out", tmp_path / "o",
             *TRAIN])
    assert_clean_error(r, r"--eval .*other@v1: targets over \d+ ids in rows of 16; expected 512 ids in rows of "
                          r"at most 16")
    from tests.helpers import run_label

    digits = run_label(data.teacher_pt, data.parquet, tmp_path / "c", "digits").path  # type: ignore[attr-defined]
    r = cli(["train", "--targets", store / "news", "--eval", digits, "--out", tmp_path / "o", *TRAIN])
    assert_clean_error(r, r"--eval .*digits@v1: holds classification targets; expected a per-token version")
    assert not (tmp_path / "o").exists()


def test_eval_version_of_another_tokenizer_is_refused(store: Path, tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "s" / "held"
    shutil.copytree(store / "held", other)
    manifest = other / "v1" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["teachers"][0]["tokenizer"]["vocab_sha256"] = "0" * 64  # the same sizes, other ids
    manifest.write_text(json.dumps(m))
    r = cli(["train", "--targets", store / "news", "--eval", other, "--out", tmp_path / "o", *TRAIN])
    assert_clean_error(r, r"--eval .*: its tokenizer's vocabulary \(sha256 000000000000\) is not the training "
                          r"version's")


def test_each_held_out_set_is_measured_by_its_own_targets(store: Path, tmp_path: Path) -> None:
    """Training draws only, --eval a top-k version (and the reverse): each held-out set's KL to the teacher comes from
    what that version stores (a run once trained to the end and then failed measuring --eval by the training
    version's kind of targets)."""
    r = cli(["convert", store / "news", "--top-k", "0", "--name", "news-drawn", "--quiet"])  # keeps the draws
    assert r.exit_code == 0, r.output
    for targets, loss, held, want in (
            ("news-drawn", "sampled", "held", "val: unbiased estimate from the stored draws at T = 1; eval: exact KL "
                                              "to the stored top-k rebuild at T = 1"),
            ("news", "topk", "drawn", "val: exact KL to the stored top-k rebuild at T = 1; eval: unbiased estimate "
                                      "from the stored draws at T = 1")):
        out = tmp_path / targets
        r = cli(["train", "--targets", store / targets, "--loss", loss, "--val-fraction", "0.25", "--eval",
                 store / held, "--out", out, *TRAIN])
        assert r.exit_code == 0, r.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["validation"]["kl_teacher"] == want
        for res in summary["runs"]:
            assert res["extra"]["eval_kl_teacher"] > 0 and res["extra"]["val_kl_teacher"] > 0
