"""Safety fine-tuning data: VLGuard in LLaVA conversation format, and a random sample of SFT data.

The paper's safety stage (REFERENCE §4.1) fine-tunes with LoRA for 3 epochs on VLGuard's training set
(2k images with instructions) mixed with 5k random SFT samples. The stage itself is the ordinary SFT
objective on a mixture (`configs/xgen-mm-phi3-mini/safety.yaml`); this module prepares its two files:

    vlguard_to_llava   VLGuard's `train.json` -> LLaVA conversations with a `safe` field:
                       an unsafe image with its instruction -> the refusal (safe: false);
                       a safe image -> one record for its safe instruction (safe: true) and one for its
                       unsafe instruction, answered with a refusal (safe: false)
    sample_records     n records drawn at random (seeded) from an SFT JSON list, in their original order

VLGuard records look like `{"id", "image", "safe", "harmful_category", "instr-resp": [...]}`, where
`instr-resp` holds `{"instruction", "response"}` for an unsafe image and `{"safe_instruction",
"response"}`, `{"unsafe_instruction", "response"}` for a safe one (github.com/ys-zong/VLGuard).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_INSTRUCTION_KEYS = {"instruction": None, "safe_instruction": True, "unsafe_instruction": False}


def vlguard_to_llava(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One LLaVA conversation per (image, instruction) of VLGuard records; `safe` says whether the request is."""
    out = []
    for record in records:
        image_safe = bool(record["safe"])
        for index, pair in enumerate(record["instr-resp"]):
            kind = next((k for k in _INSTRUCTION_KEYS if k in pair), None)
            if kind is None or "response" not in pair:
                raise ValueError(f"VLGuard record {record.get('id')!r}: instr-resp[{index}] has keys {sorted(pair)}")
            request_safe = image_safe if _INSTRUCTION_KEYS[kind] is None else image_safe and _INSTRUCTION_KEYS[kind]
            out.append(
                {
                    "id": f"{record['id']}-{index}",
                    "image": record["image"],
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{pair[kind].strip()}"},
                        {"from": "gpt", "value": pair["response"].strip()},
                    ],
                    "safe": request_safe,
                    "category": record.get("harmful_category"),
                }
            )
    return out


def sample_records(records: Sequence[Any], count: int, seed: int = 0) -> list[Any]:
    """`count` records drawn without replacement (all of them if there are fewer), in their original order."""
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    chosen = sorted(random.Random(seed).sample(range(len(records)), min(count, len(records))))
    return [records[index] for index in chosen]


def read_json_list(path: str | Path) -> list[Any]:
    records = json.loads(Path(path).read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path} holds a {type(records).__name__}, not a JSON list of records")
    return records


def write_json_list(path: str | Path, records: Sequence[Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(records), indent=1) + "\n")
    return path
