"""Stage 0: a tiny SigLIP trained from scratch on the world's caption pairs, for the VLM's frozen vision tower.

As the paper's models start from a contrastively pre-trained SigLIP, the demo first trains one:
transformers' `SiglipModel` with its own sigmoid loss, on what the VLM's tower will see later —
each caption image's squashed global view with its short caption, its any-res tiles (cut exactly as
the processor cuts them) with a caption of the objects and text inside each tile, and the text tiles
of the OCR pre-training images ('The text "YAK".'). The tiles teach the tower the scale at which small
text is legible; the global views teach it whole scenes.

Reading is what the tower learns last; it learned it with three settings together
(docs/demo-findings.md, "The tower could not read"): text tiles in half of every batch (`text_share`);
an attention mask over the caption padding, since SigLIP pools the last position and, with the
padding attended, a caption's three letters start out nearly invisible in it; and a text tower
learning 10× slower than the image tower (`text_lr_ratio`). Trained on text tiles alone without either of the last two, the tiles' embeddings
collapsed to one point (pairwise cosine 0.9998) and the loss sat at the value of a constant logit.

Only the vision tower is kept (`vision_tower/`, a `SiglipVisionModel` folder) and loaded into a VLM
with `load_vision_tower`. Three checks say what it learned, each before and after training: retrieval
on the validation pairs (image → caption, top-1 and top-5 among the distinct validation captions;
chance is 1/N); the same for the validation images' text tiles, among their distinct strings, over
all of them and per text size (the large strings are read long before the small ones); and a
patch probe (can a linear classifier read each object's colour and shape off the patch features the
VLM will read?).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase, SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from blip3.config import Blip3Config
from blip3.processing import anyres
from blip3.synthetic.config import tiny_world_config
from blip3.synthetic.tasks import GRID_INDEX, join_words, with_article
from blip3.synthetic.tokenizer import load_world_tokenizer
from blip3.synthetic.world import COLOURS, SHAPES, TEXT_SIZES


@dataclass
class Stage0Settings:
    steps: int = 500  # text tiles -> their string 55 / 60 / 68 % after 400 / 500 / 800 (docs/demo-findings.md)
    batch_size: int = 64
    learning_rate: float = 1e-3
    text_lr_ratio: float = 0.1  # the text tower's learning rate over the image tower's (see the module doc)
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    text_share: float = 0.5  # of each batch: tiles holding only a string of text, with 'The text "…".'
    tile_share: float = 0.5  # of the rest: tiles with their contents' captions (then global views)
    text_length: int = 24  # caption tokens, padded and masked (the world's longest caption has 22)
    text_width: int = 96
    text_layers: int = 2
    text_heads: int = 4
    seed: int = 0
    log_every: int = 10
    probe_images: int = 600  # training images for the patch probe (0: skip it)


@dataclass
class ViewSet:
    """Images the tower sees ([N, S, S, 3] uint8) with their captions."""

    pixels: np.ndarray
    captions: list[str]


# ---------------------------------------------------------------------------------------------------
# Data: views and captions from the caption shards


def read_caption_shards(paths: list[str | Path]) -> list[tuple]:
    """(PIL image, metadata) of every sample of caption shards, in order."""
    dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False).decode("pil")
    return [(sample["png"].convert("RGB"), sample["json"]) for sample in dataset]


def make_views(samples: list[tuple], tile_size: int, grids, with_tiles: bool) -> tuple[ViewSet, ViewSet]:
    """The global views with their short captions, and (if `with_tiles`) the non-empty tiles with theirs.

    Short captions (objects and text, no positions) keep the text tower cheap; the tower's patch
    features, which are what the VLM reads, keep positions through their position embeddings anyway.
    """
    global_views, global_captions, tiles, tile_captions = [], [], [], []
    for image, meta in samples:
        global_views.append(anyres.squashed_view(image, tile_size)[0])
        global_captions.append(meta["short_caption"])
        if not with_tiles:
            continue
        plan = anyres.plan_anyres(image.size, grids, tile_size)
        for tile, region in zip(anyres.anyres_tiles(image, plan)[1:], tile_regions(plan)):
            tile_caption = caption_of_region(meta["scene"], region)
            if tile_caption is not None:
                tiles.append(tile)
                tile_captions.append(tile_caption)
    empty = np.zeros((0, tile_size, tile_size, 3), np.uint8)
    return (
        ViewSet(np.stack(global_views), global_captions),
        ViewSet(np.stack(tiles) if tiles else empty, tile_captions),
    )


def text_tiles(samples: list[tuple], tile_size: int, grids) -> ViewSet:
    """The any-res tiles that hold one whole string, captioned 'The text "YAK".'.

    `samples` are (PIL image, text regions [{"text", "box"}]) pairs: an OCR record's "ocr" list or a
    scene's "texts". The world keeps shapes out of the cells that hold text, so such a tile shows the
    string alone.
    """
    tiles, captions = [], []
    for image, texts in samples:
        plan = anyres.plan_anyres(image.size, grids, tile_size)
        for tile, region in zip(anyres.anyres_tiles(image, plan)[1:], tile_regions(plan)):
            inside = [t["text"] for t in texts if _whole_inside(t["box"], region)]
            if len(inside) == 1:
                tiles.append(tile)
                captions.append(f'The text "{inside[0]}".')
    pixels = np.stack(tiles) if tiles else np.zeros((0, tile_size, tile_size, 3), np.uint8)
    return ViewSet(pixels, captions)


def tile_regions(plan: anyres.AnyResPlan) -> list[tuple[float, float, float, float]]:
    """Each tile's region in normalized image coordinates (row-major, as the tiles are cut)."""
    cols, rows = plan.grid
    (x0, y0), (width, height) = plan.offset, plan.resized
    regions = []
    for row in range(rows):
        for col in range(cols):
            x1, y1 = col * plan.base, row * plan.base
            regions.append(
                ((x1 - x0) / width, (y1 - y0) / height, (x1 + plan.base - x0) / width, (y1 + plan.base - y0) / height)
            )
    return regions


def caption_of_region(scene: dict, region) -> str | None:
    """'A red circle and the text "KMN".' for what lies in `region` (None if nothing does).

    A shape counts if its centre is inside; a string only if it is whole (a cut string cannot be read).
    """
    x1, y1, x2, y2 = region

    def centre_inside(box):
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        return x1 <= cx < x2 and y1 <= cy < y2

    objects = sorted((o for o in scene["objects"] if centre_inside(o["box"])), key=lambda o: GRID_INDEX[o["position"]])
    parts = [with_article(f"{o['colour']} {o['kind']}") for o in objects]
    parts += [f'the text "{t["text"]}"' for t in scene["texts"] if _whole_inside(t["box"], region)]
    if not parts:
        return None
    sentence = join_words(parts)
    return sentence[0].upper() + sentence[1:] + "."


def _whole_inside(box, region) -> bool:
    eps = 1e-3
    x1, y1, x2, y2 = region
    return x1 - eps <= box[0] and box[2] <= x2 + eps and y1 - eps <= box[1] and box[3] <= y2 + eps


def tokenize_captions(
    tokenizer: PreTrainedTokenizerBase, captions: list[str], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, length] ids, truncated or padded on the right with `<pad>`, and the mask of the real tokens.

    The mask keeps the padding out of attention: SigLIP pools the last position, which is then a
    summary of the caption alone rather than of a caption diluted by its padding.
    """
    ids = tokenizer(captions, add_special_tokens=False)["input_ids"]
    out = torch.full((len(captions), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(captions), length), dtype=torch.long)
    for row, tokens in enumerate(ids):
        tokens = tokens[:length]
        out[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return out, mask


def to_pixel_values(pixels: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> float [N, 3, S, S], `(x / 255 - mean) / std` as the VLM's processor does."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


# ---------------------------------------------------------------------------------------------------
# Model


def build_siglip(vision_config: SiglipVisionConfig, tokenizer: PreTrainedTokenizerBase, settings: Stage0Settings):
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=settings.text_width,
        intermediate_size=4 * settings.text_width,
        num_hidden_layers=settings.text_layers,
        num_attention_heads=settings.text_heads,
        max_position_embeddings=settings.text_length,
        projection_size=vision_config.hidden_size,  # text and image embeddings meet in the tower's width
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        hidden_act=vision_config.hidden_act,
        layer_norm_eps=vision_config.layer_norm_eps,
    )
    model = SiglipModel(SiglipConfig(text_config=text_config, vision_config=vision_config.to_dict()))
    with torch.no_grad():  # SigLIP's initial temperature and bias (Zhai et al. 2023): t' = log 10, b = -10
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
        # Position embeddings start as 2-D sin-cos (as in MAE), at about the patch embeddings' scale. From
        # the default N(0, 1/width) start they stay ~10× smaller than the patches' content, and the patch
        # features forget where they are: the token sampler, which pools patches, then cannot say where
        # an object is (a probe read a colour's position off its global-view tokens 38–45 % of the time).
        embeddings = model.vision_model.embeddings
        grid = vision_config.image_size // vision_config.patch_size
        embeddings.position_embedding.weight.copy_(sincos_2d(grid, vision_config.hidden_size))
    return model


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """[grid², width] fixed 2-D sin-cos position codes, rows then columns (row-major like the patches)."""
    if width % 4:
        raise ValueError(f"width {width} must be a multiple of 4 for 2-D sin-cos codes")
    frequencies = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    codes = []
    for coordinate in (rows.flatten(), cols.flatten()):
        angles = coordinate[:, None].double() * frequencies[None]
        codes += [angles.sin(), angles.cos()]
    return torch.cat(codes, dim=1).float()


@torch.no_grad()
def retrieval_accuracy(
    model: SiglipModel, pixel_values, captions: list[str], tokenizer, text_length: int, candidates=None
) -> dict:
    """Image -> caption retrieval among the distinct captions (or `candidates`): top-1 and top-5 accuracy, and chance."""
    model.eval()
    candidates = sorted(set(captions) if candidates is None else set(candidates))
    ids, mask = tokenize_captions(tokenizer, candidates, text_length)
    # transformers 5 returns the pooled, projected embeddings as `pooler_output`
    text_embeds = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    image_embeds = torch.cat(
        [model.get_image_features(pixel_values=chunk).pooler_output for chunk in pixel_values.split(256)]
    )
    scores = torch.nn.functional.normalize(image_embeds, dim=-1) @ torch.nn.functional.normalize(text_embeds, dim=-1).T
    truth = torch.tensor([candidates.index(c) for c in captions])
    top5 = scores.topk(min(5, len(candidates)), dim=-1).indices
    return {
        "top1": float((top5[:, 0] == truth).float().mean()),
        "top5": float((top5 == truth[:, None]).any(-1).float().mean()),
        "chance_top1": 1 / len(candidates),
        "num_images": len(captions),
        "num_captions": len(candidates),
    }


@torch.no_grad()
def tower_features(tower: SiglipVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """[n, 3, S, S] -> [n, g·g, d]: the features the VLM reads (as `Blip3Model.encode_tiles` computes them)."""
    chunks = []
    for chunk in pixel_values.split(256):
        hidden = tower.encoder(inputs_embeds=tower.embeddings(chunk)).last_hidden_state
        chunks.append(tower.post_layernorm(hidden))
    return torch.cat(chunks)


def object_patches(samples: list[tuple], tile_size: int, grids, patch_size: int):
    """Each object's any-res tile (uint8 [N, S, S, 3]) and rows (tile, centre patch, colour id, shape id)."""
    tiles, rows = [], []
    for image, meta in samples:
        plan = anyres.plan_anyres(image.size, grids, tile_size)
        image_tiles = anyres.anyres_tiles(image, plan)[1:]
        cells = tile_size // patch_size
        for tile, (x1, y1, x2, y2) in zip(image_tiles, tile_regions(plan)):
            inside = []
            for obj in meta["scene"]["objects"]:
                cx, cy = (obj["box"][0] + obj["box"][2]) / 2, (obj["box"][1] + obj["box"][3]) / 2
                if x1 <= cx < x2 and y1 <= cy < y2:  # the centre's patch within this tile
                    col = min(cells - 1, int((cx - x1) / (x2 - x1) * cells))
                    row = min(cells - 1, int((cy - y1) / (y2 - y1) * cells))
                    inside.append((row * cells + col, list(COLOURS).index(obj["colour"]), SHAPES.index(obj["kind"])))
            if inside:
                tiles.append(tile)
                rows += [(len(tiles) - 1, *entry) for entry in inside]
    return np.stack(tiles), np.array(rows)


def patch_probe(tower, train_samples, test_samples, config: Blip3Config, steps: int = 300) -> dict:
    """Accuracy of linear classifiers reading an object's colour and shape off the tower's patch features.

    The VLM reads patch features, not the pooled embedding the contrastive loss trains, so this checks
    what matters downstream: the 3×3 patches around each object's centre, in the any-res tile holding
    it, concatenated; fit on `train_samples`, scored on `test_samples`. Compare with an untrained tower.
    """
    grid = config.feature_grid

    def neighbourhoods(samples):
        tiles, rows = object_patches(samples, config.image_size, config.grids, config.vision_config.patch_size)
        features = tower_features(tower, to_pixel_values(tiles, config.image_mean, config.image_std))
        maps = features.reshape(len(tiles), grid, grid, -1).permute(0, 3, 1, 2)  # [n, d, g, g]
        patches = torch.nn.functional.unfold(maps, 3, padding=1).transpose(1, 2)  # [n, g·g, 9d]
        return patches[rows[:, 0], rows[:, 1]], torch.from_numpy(rows[:, 2]), torch.from_numpy(rows[:, 3])

    tower.eval()
    train_x, train_colour, train_shape = neighbourhoods(train_samples)
    test_x, test_colour, test_shape = neighbourhoods(test_samples)
    return {
        "colour": linear_probe(train_x, train_colour, test_x, test_colour, len(COLOURS), steps),
        "shape": linear_probe(train_x, train_shape, test_x, test_shape, len(SHAPES), steps),
        "train_objects": len(train_x),
        "test_objects": len(test_x),
    }


def linear_probe(train_x, train_y, test_x, test_y, classes: int, steps: int) -> float:
    """Test accuracy of a linear classifier fit full-batch with Adam on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classifier = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2)
    for _ in range(steps):  # full batch: a few thousand rows
        loss = torch.nn.functional.cross_entropy(classifier(train_x), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((classifier(test_x).argmax(-1) == test_y).float().mean())


# ---------------------------------------------------------------------------------------------------
# Training


def train_stage0(
    world_dir: str | Path,
    out_dir: str | Path,
    settings: Stage0Settings | None = None,
    config: Blip3Config | None = None,
    progress: bool = True,
) -> dict:
    """Train the tower on `world_dir`'s caption and OCR shards; write `out_dir/vision_tower`, the log, metrics.

    config: the VLM configuration whose vision tower this is (default: `tiny_world_config` of the
    world's tokenizer); its `vision_config`, tile size, grids and normalisation are used.
    Returns the metrics (also `out_dir/metrics.json`): retrieval and probes before and after, loss, seconds.
    """
    settings = settings or Stage0Settings()
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((world_dir / "manifest.json").read_text())
    tokenizer = load_world_tokenizer(world_dir)
    config = config or tiny_world_config(tokenizer)
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    start, start_cpu = time.perf_counter(), time.process_time()

    # -- data: global views, tiles, text tiles (training); global views and text tiles (validation)
    tile, grids = config.image_size, config.grids
    train = read_caption_shards([world_dir / p for p in manifest["files"]["captions/train"]])
    validation = read_caption_shards([world_dir / p for p in manifest["files"]["captions/validation"]])
    ocr = read_caption_shards([world_dir / p for p in manifest["files"]["ocr"]])
    global_views, tile_views = make_views(train, tile, grids, with_tiles=settings.tile_share > 0)
    train_text = text_tiles([(image, meta["ocr"]) for image, meta in ocr], tile, grids)
    validation_views, _ = make_views(validation, tile, grids, with_tiles=False)
    validation_text = text_tiles([(image, meta["scene"]["texts"]) for image, meta in validation], tile, grids)
    validation_text_by_size = {  # small text is read through the tiles only, and is the harder to learn
        size: text_tiles(
            [(image, [t for t in meta["scene"]["texts"] if t["size"] == size]) for image, meta in validation],
            tile,
            grids,
        )
        for size in TEXT_SIZES
    }
    mean, std = config.image_mean, config.image_std
    validation_pixels = to_pixel_values(validation_views.pixels, mean, std)
    length = settings.text_length

    # -- model, and what its tower knows before training
    model = build_siglip(config.vision_config, tokenizer, settings)

    def checks() -> dict:
        tower = model.vision_model
        # Text retrieval: each validation text tile against the distinct 'The text "…".' captions. A
        # linear probe is no test of reading here: fit on 2,000 tiles, it names the string of an untrained
        # tower's tiles about as often as a trained one's (57 %), and the VLM cannot read the former.
        found = {
            "retrieval": retrieval_accuracy(model, validation_pixels, validation_views.captions, tokenizer, length),
            "text_retrieval": None,
            "text_retrieval_by_size": {},
            "patch_probe": None,
        }
        strings = validation_text.captions  # every size's tiles are matched against all the strings

        def read(views: ViewSet) -> dict:
            return retrieval_accuracy(
                model, to_pixel_values(views.pixels, mean, std), views.captions, tokenizer, length, strings
            )

        if strings:
            found["text_retrieval"] = read(validation_text)
            found["text_retrieval_by_size"] = {s: read(v) for s, v in validation_text_by_size.items() if v.captions}
        if settings.probe_images:
            found["patch_probe"] = patch_probe(tower, train[: settings.probe_images], validation, config)
        return found

    before = checks()
    model.train()
    optimizer = build_optimizer(model, settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _learning_rate_factor(step, settings))

    # -- training
    log_path = out_dir / "stage0_log.jsonl"
    losses = []
    with log_path.open("w") as log, tqdm(range(settings.steps), desc="stage 0 (SigLIP)", disable=not progress) as bar:
        for step in bar:
            pixels, captions = _batch(rng, (train_text, tile_views, global_views), settings)
            ids, mask = tokenize_captions(tokenizer, captions, settings.text_length)
            loss = model(
                input_ids=ids, attention_mask=mask, pixel_values=to_pixel_values(pixels, mean, std), return_loss=True
            ).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step % settings.log_every == 0 or step == settings.steps - 1:
                record = {"step": step, "loss": losses[-1], "lr": schedule.get_last_lr()[0]}
                log.write(json.dumps(record | {"seconds": round(time.perf_counter() - start, 2)}) + "\n")
                log.flush()
        after = checks()
        log.write(json.dumps({"step": settings.steps, **after}) + "\n")

    model.vision_model.save_pretrained(out_dir / "vision_tower")
    metrics = {
        **{f"{name}_before": value for name, value in before.items()},
        **after,
        "first_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(losses[-10:])) if losses else None,
        "steps": settings.steps,
        "train_views": {
            "global": len(global_views.captions),
            "tiles": len(tile_views.captions),
            "text_tiles": len(train_text.captions),
        },
        "seconds": round(time.perf_counter() - start, 1),
        # CPU time over all threads: on a shared machine, wall time says more about the neighbours.
        "cpu_seconds": round(time.process_time() - start_cpu, 1),
        "threads": torch.get_num_threads(),
        "settings": asdict(settings),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def text_sizes(metrics: dict) -> str:
    """'; small text 24.6%; large text 100.0%' from `train_stage0`'s metrics ('' where it had no text tiles)."""
    by_size = metrics.get("text_retrieval_by_size") or {}
    return "".join(f"; {size} text {reads['top1']:.1%}" for size, reads in by_size.items())


def build_optimizer(model: SiglipModel, settings: Stage0Settings) -> torch.optim.AdamW:
    """AdamW with the text tower at `text_lr_ratio` of the learning rate (the image tower, temperature, bias at 1)."""
    text = list(model.text_model.parameters())
    text_ids = {id(p) for p in text}
    return torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if id(p) not in text_ids]},
            {"params": text, "lr": settings.learning_rate * settings.text_lr_ratio},
        ],
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
    )


def _learning_rate_factor(step: int, settings: Stage0Settings) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batch(rng: random.Random, pools: tuple[ViewSet, ViewSet, ViewSet], settings: Stage0Settings):
    """A batch of text tiles, tiles and global views whose captions all differ (a repeat is a false negative).

    The world has a few dozen strings, so a batch holds at most that many text tiles.
    """
    text_views, tile_views, global_views = pools
    num_text = round(settings.batch_size * settings.text_share) if len(text_views.captions) else 0
    num_tiles = round((settings.batch_size - num_text) * settings.tile_share) if len(tile_views.captions) else 0
    wanted_of = (num_text, num_tiles, settings.batch_size - num_text - num_tiles)
    picks, seen = [], set()
    for views, wanted in zip(pools, wanted_of):
        taken = 0
        for _ in range(20 * wanted):
            if taken == wanted:
                break
            index = rng.randrange(len(views.captions))
            if views.captions[index] not in seen:
                seen.add(views.captions[index])
                picks.append((views, index))
                taken += 1
    pixels = np.stack([views.pixels[index] for views, index in picks])
    return pixels, [views.captions[index] for views, index in picks]


# ---------------------------------------------------------------------------------------------------
# Into the VLM


def load_vision_tower(model, path: str | Path) -> None:
    """Copy a stage-0 tower (`out_dir/vision_tower`) into `model.model.vision_tower`; shapes must match.

    The copy stays frozen, as the VLM's tower is in every stage.
    """
    tower = SiglipVisionModel.from_pretrained(path)
    target = model.model.vision_tower
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"):
        got, want = getattr(tower.config, field), getattr(target.config, field)
        if got != want:
            raise ValueError(f"the stage-0 tower at {path} has {field}={got}, the model's has {want}")
    target.load_state_dict(tower.state_dict(), strict=True)
    target.requires_grad_(False)
