"""Agreement with a teacher of several students on the same sentences, the teacher embedded once: what
``mmkd-eval --task agreement`` reports for each (mean and 5th-percentile cosine, nearest-neighbour agreement),
as one JSON object per model.

    python scripts/agreement_table.py --teacher mpnet-base --texts held_out.txt --limit 2000 runs/a runs/b
"""

from __future__ import annotations

import argparse
import json

from mmkd.evaluate.encoders import load_encoder
from mmkd.evaluate.tasks.agreement import DEFAULT_LIMIT, dataset_texts
from mmkd_core.metrics import embedding_agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="Student or run directories (or teacher names).")
    parser.add_argument("--teacher", required=True, help="The reference model: teacher name or directory.")
    parser.add_argument("--texts", required=True, help="One sentence per line.")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="Sentences, spread over the file.")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    texts = dataset_texts("text", args.texts, "train", None, args.limit)
    reference = load_encoder(args.teacher).encode_text(texts, args.batch_size)
    for model in args.models:
        emb = load_encoder(model).encode_text(texts, args.batch_size)
        print(json.dumps({"model": model, "texts": len(texts), **embedding_agreement(emb, reference)}), flush=True)


if __name__ == "__main__":
    main()
