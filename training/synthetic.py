"""A small deterministic shapes world: images with 3-8 flat-coloured shapes, their exact visible masks and
the words that describe them.

Why: the demo model and the "it really learns" tests need region data whose answers are known exactly
(nothing downloads here). Every pixel is drawn with one flat colour and no anti-aliasing, so the
colour named is the colour drawn and each object's mask is exactly what is left visible after the
objects painted over it. Image `i` of seed `s` depends on `(s, i)` only, so adding images never changes
earlier ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .records import LabelSpace, RegionExample

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "ellipse", "cross", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 20),
}
SIZES = ("small", "medium", "large")
# Circumradius as a fraction of the image side, per size word (ranges do not overlap).
SIZE_RADII = {"small": (0.075, 0.095), "medium": (0.115, 0.135), "large": (0.155, 0.18)}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
POSITION_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
# Backgrounds are grey or beige only, so no background pixel can be mistaken for a named colour.
PLAIN_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light gray": (200, 200, 200), "dark gray": (80, 80, 80), "beige": (225, 215, 190),
}
TEXTURES = ("striped", "checkered", "noisy")
# Shapes whose look changes with rotation get a small random tilt; circle and heart are drawn upright.
MAX_TILT_DEG = {"square": 20.0, "triangle": 20.0, "star": 20.0, "hexagon": 20.0, "ellipse": 90.0, "cross": 20.0}


def label_space(shapes: Sequence[str] = SHAPES) -> LabelSpace:
    """The label set of the synthetic world: shape categories plus colour, size and position attributes."""
    return LabelSpace(tuple(shapes), {"color": tuple(COLOURS), "size": SIZES, "position": POSITIONS})


@dataclass
class ShapeObject:
    """One drawn object: `mask` is its visible part (after occlusion), `full_mask` the whole shape."""

    shape: str
    colour: str
    size: str
    position: str
    center: tuple[float, float]  # (x, y) in pixels
    radius: float
    angle: float  # degrees
    mask: np.ndarray = field(repr=False)
    full_mask: np.ndarray = field(repr=False)
    occluders: list[int] = field(default_factory=list)  # indices of objects drawn over this one

    @property
    def visible_fraction(self) -> float:
        return float(self.mask.sum()) / max(1, int(self.full_mask.sum()))

    def short(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {POSITION_PHRASES[self.position]}"


@dataclass
class Scene:
    """One image and its objects in drawing order (later objects are on top)."""

    index: int
    seed: int
    image: np.ndarray = field(repr=False)  # HxWx3 uint8
    background: str
    objects: list[ShapeObject]

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[0]

    @property
    def file_name(self) -> str:
        return f"shapes_{self.seed}_{self.index:06d}.png"

    def detailed(self, k: int) -> str:
        """A few sentences about object `k`: what, where, what covers it, and on what."""
        obj = self.objects[k]
        text = (f"This is a {obj.size} {obj.colour} {obj.shape} {POSITION_PHRASES[obj.position]} of the image. ")
        if obj.occluders:
            others = [self.objects[j] for j in obj.occluders]
            names = " and ".join(f"a {o.colour} {o.shape}" for o in others)
            text += f"It is partly covered by {names}. "
        else:
            text += "It is fully visible. "
        return text + f"The background is {self.background}."

    def png_bytes(self) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(self.image).save(buf, format="PNG", optimize=False)
        return buf.getvalue()


# --- drawing ---------------------------------------------------------------------------------------------


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape with circumradius `r`, rotated by `angle` degrees."""
    if shape == "square":
        pts = [(math.cos(math.radians(45 + 90 * i)), math.sin(math.radians(45 + 90 * i))) for i in range(4)]
    elif shape == "triangle":
        pts = [(math.cos(math.radians(-90 + 120 * i)), math.sin(math.radians(-90 + 120 * i))) for i in range(3)]
    elif shape == "hexagon":
        pts = [(math.cos(math.radians(60 * i)), math.sin(math.radians(60 * i))) for i in range(6)]
    elif shape == "star":
        pts = []
        for i in range(10):
            rr = 1.0 if i % 2 == 0 else 0.42
            a = math.radians(-90 + 36 * i)
            pts.append((rr * math.cos(a), rr * math.sin(a)))
    elif shape == "cross":
        w = 0.3
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
               (-w, -w)]
        pts = [(x * 0.85, y * 0.85) for x, y in pts]
    else:
        raise ValueError(f"{shape} is not a polygon shape")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, width: int, height: int) -> np.ndarray:
    """The full (unoccluded) boolean mask of one shape, pixel centres at (x+0.5, y+0.5)."""
    if shape in ("circle", "ellipse", "heart"):
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
        x, y = (xs + 0.5 - cx) / r, (ys + 0.5 - cy) / r
        if shape == "circle":
            return x * x + y * y <= 1.0
        if shape == "ellipse":
            c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            u, v = x * c + y * s, -x * s + y * c
            return (u / 1.0) ** 2 + (v / 0.5) ** 2 <= 1.0
        # heart: (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y up, scaled to fit the circumradius
        hx, hy = x * 1.25, -(y * 1.25 - 0.15)
        return (hx * hx + hy * hy - 1.0) ** 3 - hx * hx * hy**3 <= 0.0
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(_polygon(shape, cx, cy, r, angle), fill=255)
    return np.asarray(canvas) > 0


def _background(rng: np.random.Generator, width: int, height: int, textured: bool) -> tuple[np.ndarray, str]:
    names = list(PLAIN_BACKGROUNDS)
    base_name = names[int(rng.integers(len(names)))]
    base = np.array(PLAIN_BACKGROUNDS[base_name], dtype=np.int16)
    img = np.broadcast_to(base, (height, width, 3)).copy()
    if not textured:
        return img.astype(np.uint8), f"a plain {base_name}"
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    shade = -35 if base.mean() > 128 else 35
    ys, xs = np.mgrid[0:height, 0:width]
    if kind == "striped":
        period = int(rng.integers(6, 14))
        on = ((xs + ys) // period) % 2 == 0 if rng.random() < 0.5 else (ys // period) % 2 == 0
    elif kind == "checkered":
        period = int(rng.integers(8, 20))
        on = ((xs // period) + (ys // period)) % 2 == 0
    else:
        on = rng.random((height, width)) < 0.5
        shade //= 2
    img[on] += shade  # the same offset on all three channels keeps the texture grey
    return np.clip(img, 0, 255).astype(np.uint8), f"a {kind} {base_name}"


def _position_word(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    col = min(2, int(3 * (xs.mean() + 0.5) / w))
    row = min(2, int(3 * (ys.mean() + 0.5) / h))
    return {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center",
            (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}[(row, col)]


def generate_scene(
    seed: int,
    index: int,
    image_size: int = 384,
    objects: tuple[int, int] = (3, 8),
    shapes: Sequence[str] = SHAPES,
    min_visible: float = 0.6,
    textured: float = 0.5,
    max_tries: int = 200,
    layout: str = "random",
    jitter: float = 0.15,
    max_tilt: float = 1.0,
    colour_of: dict[str, str] | None = None,
) -> Scene:
    """Image `index` of `seed`: objects placed one by one, each kept only if every object keeps at least
    `min_visible` of its area visible (so each stays recognisable); `textured` is the chance of a texture.

    `layout="grid"` puts objects near the centres of a 3x3 grid (± `jitter` of a cell), one per cell
    while cells are free: fewer distinct mask positions, which small models trained in minutes need;
    `max_tilt` scales the random rotation of the shapes that have one (0: all upright). `colour_of`
    (shape -> colour) ties each shape to one colour: a world that models with a frozen random vision
    tower can learn in seconds (their pooled features name colours, not outlines)."""
    if layout not in ("random", "grid"):
        raise ValueError(f"layout must be 'random' or 'grid', got {layout!r}")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        raise ValueError(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    if not 1 <= objects[0] <= objects[1]:
        raise ValueError(f"objects must be a range (lo, hi) with 1 <= lo <= hi, got {objects}")
    if colour_of is not None and (set(shapes) - set(colour_of) or set(colour_of.values()) - set(COLOURS)):
        raise ValueError("colour_of must give every shape one of the known colours")
    rng = np.random.default_rng([seed, index])
    w = h = int(image_size)
    image, background = _background(rng, w, h, rng.random() < textured)
    want = int(rng.integers(objects[0], objects[1] + 1))
    placed: list[tuple[str, str, str, float, float, float, float, np.ndarray]] = []
    used_cells: set[int] = set()
    for _ in range(max_tries):
        if len(placed) == want:
            break
        shape = shapes[int(rng.integers(len(shapes)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        if colour_of is not None:
            colour = colour_of[shape]
        size = SIZES[int(rng.integers(len(SIZES)))]
        lo, hi = SIZE_RADII[size]
        r = float(rng.uniform(lo, hi)) * w
        if layout == "grid":  # a free cell of the 3x3 grid, its centre jittered
            free = [c for c in range(9) if c not in used_cells]
            cell = free[int(rng.integers(len(free)))] if free else int(rng.integers(9))
            cx = float(np.clip((cell % 3 + 0.5 + rng.uniform(-jitter, jitter)) * w / 3, r + 1, w - r - 1))
            cy = float(np.clip((cell // 3 + 0.5 + rng.uniform(-jitter, jitter)) * h / 3, r + 1, h - r - 1))
        else:
            cell = -1
            cx, cy = float(rng.uniform(r + 1, w - r - 1)), float(rng.uniform(r + 1, h - r - 1))
        tilt = MAX_TILT_DEG.get(shape, 0.0) * max_tilt
        angle = float(rng.uniform(-tilt, tilt)) if tilt else 0.0
        full = shape_mask(shape, cx, cy, r, angle, w, h)
        candidate = placed + [(shape, colour, size, cx, cy, r, angle, full)]
        if _all_visible_enough([p[-1] for p in candidate], min_visible):
            placed = candidate
            used_cells.add(cell)
    fulls = [p[-1] for p in placed]
    visible = _visible_masks(fulls)
    objs: list[ShapeObject] = []
    for i, ((shape, colour, size, cx, cy, r, angle, full), vis) in enumerate(zip(placed, visible, strict=True)):
        image[full] = COLOURS[colour]
        occluders = [j for j in range(i + 1, len(placed)) if (full & fulls[j]).any()]
        objs.append(ShapeObject(shape, colour, size, _position_word(vis), (cx, cy), r, angle, vis, full, occluders))
    return Scene(index=index, seed=seed, image=image, background=background, objects=objs)


def _visible_masks(fulls: list[np.ndarray]) -> list[np.ndarray]:
    """Each mask minus the union of every mask drawn after it."""
    out: list[np.ndarray] = [None] * len(fulls)  # type: ignore[list-item]
    above = np.zeros_like(fulls[0]) if fulls else None
    for i in range(len(fulls) - 1, -1, -1):
        out[i] = fulls[i] & ~above
        above = above | fulls[i]
    return out


def _all_visible_enough(fulls: list[np.ndarray], min_visible: float) -> bool:
    return all(v.sum() >= min_visible * f.sum() and v.any() for v, f in zip(_visible_masks(fulls), fulls,
                                                                              strict=True))


def generate(n_images: int, seed: int = 0, start: int = 0, **kwargs: Any) -> Iterator[Scene]:
    """Scenes `start .. start+n_images-1` of `seed` (see `generate_scene` for the options)."""
    for i in range(start, start + n_images):
        yield generate_scene(seed, i, **kwargs)


# --- records and writers ---------------------------------------------------------------------------------


def coco_rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE with string counts (JSON-ready)."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def region_examples(scene: Scene, image_path: str | Path, image_sha256: str | None = None) -> list[RegionExample]:
    """The scene's objects as training records (all answers known: category, attributes, descriptions)."""
    sha = image_sha256 or hashlib.sha256(scene.png_bytes()).hexdigest()
    w, h = scene.size
    return [
        RegionExample(
            image=str(image_path), image_sha256=sha, width=w, height=h, rle=coco_rle(o.mask), category=o.shape,
            attributes={"color": (o.colour,), "size": (o.size,), "position": (o.position,)},
            short=o.short(), detailed=scene.detailed(k), region_id=f"{scene.seed}-{scene.index}-{k}",
            task_id=f"{scene.seed}-{scene.index}",
        )
        for k, o in enumerate(scene.objects)
    ]


def write_images(scenes: Iterable[Scene], out_dir: str | Path) -> list[tuple[Scene, Path, str]]:
    """PNG per scene under `out_dir/images`; returns (scene, path, sha256 of the file)."""
    images = Path(out_dir) / "images"
    images.mkdir(parents=True, exist_ok=True)
    out = []
    for scene in scenes:
        data = scene.png_bytes()
        path = images / scene.file_name
        path.write_bytes(data)
        out.append((scene, path, hashlib.sha256(data).hexdigest()))
    return out


def osprey_entry(scene: Scene) -> dict[str, Any]:
    """One Osprey-724K-style entry: regions as COCO RLE, a short-form conversation about every region and
    the per-region detailed descriptions (`"<regionK>: text"`)."""
    w, h = scene.size
    convs: list[dict[str, str]] = []
    for k, o in enumerate(scene.objects, start=1):
        convs.append({"from": "human", "value": f"What is the category of <region{k}>?"})
        convs.append({"from": "gpt", "value": o.shape})
        convs.append({"from": "human", "value": f"What is the color of <region{k}>?"})
        convs.append({"from": "gpt", "value": o.colour})
    return {
        "file_name": scene.file_name, "height": h, "width": w,
        "annotation": [
            {"segmentation": coco_rle(o.mask), "category_name": o.shape,
             "attributes": {"color": o.colour, "size": o.size, "position": o.position}, "short": o.short()}
            for o in scene.objects
        ],
        "conversations": convs,
        "description": [f"<region{k}>: {scene.detailed(k - 1)}" for k in range(1, len(scene.objects) + 1)],
    }


def labelstudio_task(scene: Scene, image_url: str, from_name: str = "category", to_name: str = "image",
                     model_version: str = "synthetic") -> dict[str, Any]:
    """A Label Studio task with the objects pre-drawn as brush regions (labels, colour and size choices,
    captions) in `predictions`, so an annotator can review and correct them."""
    from osprey_core.regions import Region

    w, h = scene.size
    result: list[dict[str, Any]] = []
    for k, o in enumerate(scene.objects):
        rid = f"s{scene.index}r{k}"
        common = {"id": rid, "to_name": to_name, "original_width": w, "original_height": h, "image_rotation": 0}
        rle = Region.from_mask(o.mask).to_ls_brush()
        result.append({**common, "from_name": from_name, "type": "brushlabels",
                       "value": {"format": "rle", "rle": rle, "brushlabels": [o.shape]}})
        for name, value in (("color", o.colour), ("size", o.size)):
            result.append({**common, "from_name": name, "type": "choices",
                           "value": {"format": "rle", "rle": rle, "choices": [value]}})
        result.append({**common, "from_name": "caption", "type": "textarea",
                       "value": {"format": "rle", "rle": rle, "text": [o.short()]}})
    return {"data": {"image": image_url}, "predictions": [{"model_version": model_version, "result": result}]}


def demo_data(out_dir: str | Path, images: int = 200, seed: int = 0, image_size: int = 384,
              image_url_prefix: str = "/data/local-files/?d=", **kwargs: Any) -> dict[str, Path]:
    """Everything `osprey demo-data` writes: PNGs, `osprey.json` (Osprey-724K style), `regions.jsonl`
    (`RegionExample`s), `labelstudio_tasks.json` and `label_space.json`. Returns the written paths."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scenes = tqdm(generate(images, seed=seed, image_size=image_size, **kwargs), total=images,
                  desc="shapes", unit="image", disable=None)
    written = write_images(scenes, out)
    entries, tasks, lines = [], [], []
    for scene, path, sha in written:
        entries.append(osprey_entry(scene))
        tasks.append(labelstudio_task(scene, image_url_prefix + str(path.resolve())))
        lines += [json.dumps(r.to_dict()) for r in region_examples(scene, path.resolve(), sha)]
    shapes = kwargs.get("shapes", SHAPES)
    paths = {"images": out / "images", "osprey": out / "osprey.json", "regions": out / "regions.jsonl",
             "labelstudio": out / "labelstudio_tasks.json", "label_space": out / "label_space.json"}
    paths["osprey"].write_text(json.dumps(entries))
    paths["regions"].write_text("\n".join(lines) + ("\n" if lines else ""))
    paths["labelstudio"].write_text(json.dumps(tasks))
    paths["label_space"].write_text(json.dumps(label_space(shapes).to_dict(), indent=2))
    return paths


def read_region_examples(path: str | Path) -> list[RegionExample]:
    """`regions.jsonl` -> RegionExamples."""
    return [RegionExample.from_dict(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
