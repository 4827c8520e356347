"""Progressive-length LoRA fine-tuning: the same code path as `ctxext finetune`.

python scripts/finetune.py --config configs/tiny.yaml [--output-dir DIR] [--resume] [key=value ...]
accelerate launch --multi_gpu --num_processes 2 scripts/finetune.py --config configs/tiny.yaml  # 2 CPU processes
"""

import argparse
import sys

from ctxext.cli.main import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--output-dir")
    parser.add_argument("--resume", action="store_true")
    args, overrides = parser.parse_known_args()
    argv = ["finetune", args.config, *overrides]
    argv += ["--output-dir", args.output_dir] if args.output_dir else []
    argv += ["--resume"] if args.resume else []
    sys.exit(main(argv))
