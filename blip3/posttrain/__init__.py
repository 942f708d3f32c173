"""Post-training: preference optimisation with LoRA and safety fine-tuning (issue 5).

The stages are recipes of the one training loop (`blip3 train configs/.../dpo.yaml`):

    blip3/training/lora.py   LoRA adapters through peft, injected in place; save / load / merge / export
    blip3/training/dpo.py    DPO losses, per-sequence log-probabilities, the DPO micro-batch objective

This package holds what surrounds them:

    noised.py    the second DPO pass's extra rejected answers: the model's own answers on noised images
    safety.py    VLGuard -> LLaVA conversations with a `safe` field; seeded samples of SFT data
    cli.py       `blip3 post-train noised-negatives | merge | lora-share | vlguard | sample`
    testing.py   tiny preference data and base checkpoints for tests, benchmarks and trial runs
"""
