"""How synthetic objects are coloured: materials, and per kind of surface a mix of them.

In real scans an object's colour says something about its class, never everything: sofas
are upholstered, toilets, sinks and tubs white ceramic, beds show light bedding, fridges
are white or steel, windows are bright glass in mostly white frames, bookshelves darker
wood, counters stone, office chairs black; but chairs, tables, desks, doors and cabinets
can all be wood. The generator models this in two levels:

- `MATERIALS`: shared looks (light / mid / dark wood, white paint, ceramic, steel, glass,
  stone, fabrics, leather, ...). Each is a few base colours (swatches), a brightness
  spread and a tint strength.
- `APPEARANCE`: for every kind of surface (an object class, or a part of one such as
  "door frame", "window glass", "bedding") its weights over those materials, usually one
  leading material (weight 0.3 to 1) and a tail shared with other classes.

`draw_color(rng, kind)` gives one object (or part) its base colour: a material by the
kind's weights, a swatch, a brightness within the material's spread and a small tint.
The rest of the look is added elsewhere: sets of like objects share one finish
(`groups.share_finish`), and the scene adds lighting, per-point colour noise and a
per-scan exposure and white balance (`scene.generate_scene`). Walls are painted (white,
off-white, pale tints), floors wood, carpet or tile.

`draw_color` always takes the same draws from the random stream whatever the kind (one
integer, one uniform, three normals), so changing these tables recolours rooms without
moving any geometry or label drawn after a colour. What this model changed in the
colour-only separability of the classes is recorded in `docs/benchmarks.md`.
"""

from __future__ import annotations

import numpy as np

# material -> (swatches: base sRGB colours, brightness spread s: the object's base colour is
# scaled by a factor in [1 - s, 1 + s], tint sd: per-channel Gaussian shift of the object).
MATERIALS: dict[str, tuple[tuple[tuple[int, int, int], ...], float, float]] = {
    "light wood": (((205, 175, 135), (195, 160, 115), (215, 190, 150), (185, 150, 105)), 0.12, 7),
    "mid wood": (((150, 111, 60), (160, 120, 80), (135, 95, 60), (170, 125, 75)), 0.12, 7),
    "dark wood": (((95, 65, 45), (80, 55, 40), (110, 75, 50), (65, 45, 35)), 0.15, 6),
    "white paint": (((232, 232, 226), (220, 220, 214), (238, 234, 222)), 0.06, 5),
    "off-white": (((225, 215, 190), (215, 205, 185), (230, 222, 200)), 0.06, 6),
    "ceramic": (((238, 238, 235), (228, 230, 230), (242, 240, 232)), 0.04, 3),
    "grey": (((150, 150, 152), (120, 120, 122), (175, 175, 175)), 0.1, 5),
    "black": (((35, 35, 38), (50, 46, 45), (28, 28, 30)), 0.15, 4),
    "steel": (((180, 182, 186), (160, 162, 166), (200, 202, 205)), 0.08, 4),
    "grey fabric": (((110, 110, 112), (85, 85, 90), (140, 138, 135)), 0.12, 6),
    "beige fabric": (((185, 165, 135), (170, 150, 120), (200, 185, 160)), 0.1, 7),
    "blue fabric": (((60, 75, 125), (45, 60, 100), (90, 110, 150)), 0.12, 8),
    "red fabric": (((135, 45, 45), (110, 35, 40), (160, 70, 60)), 0.12, 8),
    "green fabric": (((60, 100, 70), (85, 115, 80), (70, 90, 60)), 0.12, 8),
    "leather": (((75, 50, 35), (45, 35, 30), (110, 75, 50)), 0.15, 6),
    "bedding": (
        ((238, 236, 230), (225, 220, 205), (200, 210, 228), (210, 210, 212), (235, 220, 205)),
        0.05,
        5,
    ),
    "stone": (((120, 115, 110), (70, 70, 72), (200, 190, 172), (165, 160, 152)), 0.1, 6),
    "glass": (((170, 200, 238), (155, 185, 230), (185, 210, 242), (145, 175, 220)), 0.1, 8),
    "cardboard": (((175, 135, 90), (190, 155, 110), (160, 125, 85)), 0.1, 6),
    "colourful": (
        (
            (200, 60, 50),
            (60, 120, 200),
            (230, 200, 60),
            (90, 170, 90),
            (240, 240, 240),
            (180, 90, 160),
            (240, 140, 60),
            (40, 40, 60),
        ),
        0.15,
        12,
    ),
    "plastic": (((60, 110, 190), (60, 150, 80), (200, 50, 50), (230, 200, 60)), 0.1, 8),
    "carpet": (((115, 110, 105), (85, 95, 120), (150, 135, 115), (90, 70, 65)), 0.12, 6),
    "tile": (((205, 205, 198), (175, 175, 170), (215, 205, 190)), 0.06, 5),
    "wall paint": (
        ((236, 234, 228), (225, 225, 220), (230, 220, 200), (210, 220, 225), (220, 228, 212)),
        0.04,
        4,
    ),
}

# kind of surface -> ((material, weight), ...). A kind is an object class or one part of
# it ("door frame", "office chair base"). Kinds share materials (wood tables, desks,
# chairs and doors; white toilets, sinks, tubs and fridges), so colour is a cue, never a
# label.
APPEARANCE: dict[str, tuple[tuple[str, float], ...]] = {
    # structure
    "wall": (("wall paint", 1.0),),
    "floor wood": (("light wood", 0.4), ("mid wood", 0.45), ("dark wood", 0.15)),
    "floor carpet": (("carpet", 1.0),),
    "floor tile": (("tile", 0.7), ("grey", 0.3)),
    # seating
    "chair": (
        ("mid wood", 0.35),
        ("dark wood", 0.25),
        ("black", 0.2),
        ("white paint", 0.05),
        ("plastic", 0.05),
        ("red fabric", 0.05),
        ("grey fabric", 0.05),
    ),
    "office chair": (
        ("black", 0.65),
        ("grey fabric", 0.15),
        ("blue fabric", 0.1),
        ("leather", 0.1),
    ),
    "office chair base": (("black", 0.6), ("steel", 0.4)),
    "couch": (
        ("grey fabric", 0.3),
        ("blue fabric", 0.25),
        ("beige fabric", 0.15),
        ("leather", 0.1),
        ("green fabric", 0.1),
        ("red fabric", 0.1),
    ),
    "cushion": (("colourful", 0.4), ("beige fabric", 0.2), ("grey fabric", 0.2), ("bedding", 0.2)),
    "ottoman": (
        ("leather", 0.3),
        ("grey fabric", 0.25),
        ("beige fabric", 0.25),
        ("blue fabric", 0.1),
        ("red fabric", 0.1),
    ),
    # tables and storage
    "table": (("mid wood", 0.4), ("light wood", 0.25), ("white paint", 0.2), ("black", 0.15)),
    "coffee table": (
        ("dark wood", 0.35),
        ("mid wood", 0.3),
        ("black", 0.2),
        ("light wood", 0.1),
        ("white paint", 0.05),
    ),
    "desk": (("light wood", 0.35), ("grey", 0.3), ("white paint", 0.2), ("black", 0.15)),
    "cabinet wood": (("light wood", 0.75), ("mid wood", 0.15), ("dark wood", 0.1)),
    "cabinet painted": (("white paint", 0.75), ("grey", 0.15), ("black", 0.1)),
    "handle": (("steel", 0.7), ("black", 0.3)),
    "bookshelf": (("dark wood", 0.65), ("mid wood", 0.15), ("white paint", 0.1), ("black", 0.1)),
    "books": (("colourful", 1.0),),
    "nightstand": (
        ("mid wood", 0.35),
        ("dark wood", 0.3),
        ("light wood", 0.2),
        ("white paint", 0.15),
    ),
    "tv stand": (("dark wood", 0.35), ("black", 0.3), ("mid wood", 0.2), ("white paint", 0.15)),
    "counter": (("stone", 0.6), ("white paint", 0.2), ("light wood", 0.1), ("black", 0.1)),
    "box": (("cardboard", 0.8), ("white paint", 0.1), ("plastic", 0.1)),
    # bedroom
    "bed frame": (
        ("mid wood", 0.3),
        ("dark wood", 0.3),
        ("light wood", 0.15),
        ("grey fabric", 0.15),
        ("white paint", 0.1),
    ),
    "bedding": (("bedding", 0.85), ("beige fabric", 0.1), ("blue fabric", 0.05)),
    "pillow": (("bedding", 0.85), ("colourful", 0.15)),
    # bathroom and kitchen
    "toilet": (("ceramic", 0.95), ("off-white", 0.05)),
    "sink": (("ceramic", 0.7), ("steel", 0.3)),
    "bathtub": (("ceramic", 0.85), ("off-white", 0.15)),
    "shower curtain": (("white paint", 0.55), ("bedding", 0.2), ("colourful", 0.25)),
    "refrigerator": (("steel", 0.6), ("white paint", 0.3), ("black", 0.1)),
    "microwave": (("black", 0.5), ("steel", 0.3), ("white paint", 0.2)),
    "towel": (
        ("white paint", 0.35),
        ("blue fabric", 0.2),
        ("beige fabric", 0.2),
        ("red fabric", 0.1),
        ("green fabric", 0.15),
    ),
    "mirror": (("glass", 0.5), ("steel", 0.5)),
    # openings and walls
    "door": (("mid wood", 0.65), ("white paint", 0.15), ("dark wood", 0.1), ("light wood", 0.1)),
    "door frame": (("mid wood", 0.45), ("white paint", 0.4), ("dark wood", 0.15)),
    "window frame": (("white paint", 0.65), ("steel", 0.2), ("black", 0.05), ("mid wood", 0.1)),
    "window glass": (("glass", 0.9), ("grey", 0.1)),
    "curtain": (
        ("off-white", 0.35),
        ("beige fabric", 0.3),
        ("grey fabric", 0.1),
        ("blue fabric", 0.1),
        ("red fabric", 0.08),
        ("green fabric", 0.07),
    ),
    "picture": (("colourful", 0.8), ("black", 0.1), ("mid wood", 0.1)),
    "whiteboard": (("white paint", 1.0),),
    # electronics, lamps, bins, bags
    "tv": (("black", 1.0),),
    "monitor": (("black", 1.0),),
    "lamp": (("steel", 0.4), ("black", 0.4), ("light wood", 0.2)),
    "lamp shade": (("off-white", 0.7), ("white paint", 0.3)),
    "trash can": (
        ("black", 0.4),
        ("grey", 0.25),
        ("steel", 0.15),
        ("plastic", 0.1),
        ("white paint", 0.1),
    ),
    "backpack": (
        ("black", 0.35),
        ("blue fabric", 0.2),
        ("plastic", 0.15),
        ("red fabric", 0.15),
        ("grey fabric", 0.15),
    ),
}


def draw_color(rng: np.random.Generator, kind: str) -> np.ndarray:
    """A per-object base colour f64[3] for a kind of surface (an `APPEARANCE` key).

    Draws a material by the kind's weights, a swatch of it, a brightness factor and a
    per-channel tint. Whatever the kind it takes the same draws (one integer, one uniform,
    three normals), so the colour model never shifts the geometry drawn after it from the
    same stream.
    """
    if kind not in APPEARANCE:
        raise KeyError(
            f"draw_color: unknown kind of surface {kind!r}; add it to appearance.APPEARANCE"
        )
    key = int(rng.integers(1 << 16))  # swatch
    u = float(rng.random())  # material, then brightness within it
    z = rng.standard_normal(3)  # tint
    names, weights = zip(*APPEARANCE[kind], strict=True)
    edges = np.cumsum(weights) / np.sum(weights)
    m = min(int(np.searchsorted(edges, u, side="right")), len(names) - 1)
    lo = edges[m - 1] if m else 0.0
    within = (u - lo) / (edges[m] - lo)  # uniform in [0, 1) given the material
    swatches, spread, tint = MATERIALS[names[m]]
    base = np.asarray(swatches[key % len(swatches)], float)
    return np.clip(base * (1 + spread * (2 * within - 1)) + tint * z, 0, 255)
