"""Adversarial fine-tuning with MART (+CAS when the config says so).

    python recipes/finetune_mart.py --config recipes/configs/<config>.yaml
    accelerate launch recipes/finetune_mart.py --config recipes/configs/<config>.yaml
"""
from casify.recipe import main

if __name__ == "__main__":
    main("mart")
