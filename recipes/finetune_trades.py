"""Adversarial fine-tuning with TRADES (+CAS when the config says so): the same as ``casify train --method trades``.

    python recipes/finetune_trades.py --config recipes/configs/<config>.yaml
    accelerate launch recipes/finetune_trades.py --config recipes/configs/<config>.yaml
"""
import sys

from casify_cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--method", "trades", *sys.argv[1:]]))
