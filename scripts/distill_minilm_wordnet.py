"""A real text distillation, end to end: all-MiniLM-L6-v2 -> a 3-block student, on WordNet sentences.

Extracts the teacher's targets once, trains students that differ only in init and loss from the same
store, and prints MRPC zero-shot retrieval for each as a markdown table (the README's table).

    HF_HUB_OFFLINE=1 python scripts/distill_minilm_wordnet.py --work runs/wordnet --steps 1500
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmkd.evaluate.encoders import load_encoder
from mmkd.evaluate.tasks import eval_paraphrase
from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd.train.config import TrainConfig
from mmkd.train.loop import train
from mmkd_core.students import create_student, save_student
from mmkd_core.teachers import create_teacher

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIANTS = [  # name, init, loss
    ("token + pooled", "teacher", "token_mse=1,pooled_mse=1"),
    ("pooled only", "teacher", "pooled_mse=1"),
    ("token only", "teacher", "token_mse=1"),
    ("token + pooled, random init", "random", "token_mse=1,pooled_mse=1"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("runs/wordnet"))
    ap.add_argument("--sentences", default=str(SHARED / "wordnet" / "sentences.txt"))
    ap.add_argument("--mrpc", default=str(SHARED / "mrpc"))
    ap.add_argument("--limit", type=int, default=None, help="first N sentences only")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "minilm-wordnet.zarr"
    t = time.perf_counter()
    s = extract(
        ExtractConfig(
            teacher="minilm-l6", dataset="text", data_root=args.sentences, out=store, limit=args.limit, batch_size=128
        ),
        show_progress=True,
    )
    print(f"extracted {s.samples} sentences in {time.perf_counter() - t:.0f} s ({s.bytes_per_sample:.0f} B/sample)")

    rows: list[tuple[str, dict]] = []
    teacher = create_teacher("minilm-l6")
    rows.append(("teacher all-MiniLM-L6-v2 (6 blocks)", eval_paraphrase(load_encoder("minilm-l6"), "mrpc", args.mrpc)))
    init_dir = args.work / "init"
    if not (init_dir / "mmkd_student.json").exists():
        student = create_student(
            "text", depth=3, init="pretrained", init_from=teacher, pool="mean", target_dim=384, pooled_dim=384
        ).eval()
        save_student(student, init_dir, tokenizer=teacher.tokenizer)
    rows.append(
        (
            "student at init (first 3 blocks), before training",
            eval_paraphrase(load_encoder(str(init_dir)), "mrpc", args.mrpc),
        )
    )
    for name, init, loss in VARIANTS:
        run = args.work / name.replace(" ", "_").replace(",", "").replace("+", "plus")
        if not (run / "student" / "mmkd_student.json").exists():
            t = time.perf_counter()
            train(
                TrainConfig(
                    targets=store,
                    depth=3,
                    init=init,
                    loss=loss,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    run_dir=run,
                    ckpt_every=10_000,
                )
            )
            print(f"{name}: trained in {time.perf_counter() - t:.0f} s")
        rows.append((f"trained: {name}", eval_paraphrase(load_encoder(str(run)), "mrpc", args.mrpc)))
        print(f"{rows[-1][0]}: mean {rows[-1][1]['mean']:.4f}", flush=True)
        (args.work / "results.json").write_text(json.dumps(dict(rows), indent=2))

    teacher_mean, init_mean = rows[0][1]["mean"], rows[1][1]["mean"]
    keys = [k for k in rows[0][1] if k != "mean"]
    print("\n| model | " + " | ".join(k.split("/", 1)[1] for k in keys) + " | mean | of teacher | gap closed |")
    print("|---" * (len(keys) + 4) + "|")
    for name, r in rows:
        closed = (r["mean"] - init_mean) / (teacher_mean - init_mean) if teacher_mean != init_mean else float("nan")
        print(
            f"| {name} | "
            + " | ".join(f"{r[k]:.3f}" for k in keys)
            + f" | {r['mean']:.4f} | {r['mean'] / teacher_mean:.2%} | {closed:.0%} |"
        )
    (args.work / "results.json").write_text(json.dumps(dict(rows), indent=2))


if __name__ == "__main__":
    main()
