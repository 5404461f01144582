"""Adversarial fine-tuning with AT (+CAS when the config says so): the same as ``casify train --method at``.

    python recipes/finetune_at.py --config recipes/configs/<config>.yaml
    accelerate launch recipes/finetune_at.py --config recipes/configs/<config>.yaml
"""
import sys

from casify_cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--method", "at", *sys.argv[1:]]))
