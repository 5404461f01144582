"""Adversarial fine-tuning with MART (+CAS when the config says so): the same as ``casify train --method mart``.

    python recipes/finetune_mart.py --config recipes/configs/<config>.yaml
    accelerate launch recipes/finetune_mart.py --config recipes/configs/<config>.yaml
"""
import sys

from casify_cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--method", "mart", *sys.argv[1:]]))
