"""Evaluate a saved model's robustness: the same as ``casify eval``.

    python recipes/evaluate.py runs/my_model --data digits --suite standard --eps 8/255 --out runs/my_model/eval
"""
import sys

from casify_cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
