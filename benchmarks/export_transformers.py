"""Export transformer models with random weights to ONNX for fusion benchmarks and tests.

Needs the `export` extra (torch==2.13.0, the CPU build on local disk, and transformers):

    python -m pip install -e ".[export]"
    python benchmarks/export_transformers.py OUT_DIR [--variants minilm-legacy-eager,resnet50-dynamo,...] [--size tiny]

The models and variants are those of ``models/exports.py``: text (the default set) writes
minilm-<exporter>-<attention>.onnx for legacy-eager, legacy-sdpa, dynamo-eager, dynamo-sdpa;
``--variants vision`` writes <model>-<exporter>.onnx for vit, resnet50, mobilenetv2 and
convnext with both exporters; ``all`` both. ``--size tiny`` exports the small test sizes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # models/ lives at the repository root
    sys.path.insert(0, str(ROOT))

from models.exports import TEXT_VARIANTS, VARIANTS, VISION_VARIANTS, export  # noqa: E402

GROUPS = {"text": TEXT_VARIANTS, "vision": VISION_VARIANTS, "all": VARIANTS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--variants",
        default=",".join(TEXT_VARIANTS),
        help="comma-separated variants, or the groups 'text' (the default), 'vision', 'all'",
    )
    parser.add_argument("--size", choices=("bench", "tiny"), default="bench", help="benchmark sizes (default) or the tiny test sizes")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    chosen: list[str] = []
    for item in args.variants.split(","):
        item = item.removeprefix("minilm-")
        if item not in VARIANTS and item not in GROUPS:
            parser.error(f"unknown variant '{item}' (choose from {', '.join(VARIANTS)} or {', '.join(GROUPS)})")
        chosen.extend(v for v in GROUPS.get(item, (item,)) if v not in chosen)
    for variant in chosen:
        start = time.perf_counter()
        path = export(variant, args.out_dir, args.size)
        print(f"{path}  ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
