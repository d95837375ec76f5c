"""Room recipes and the furnishing of one room.

`layout_room(rng, style)` draws a room type (by `ROOM_WEIGHTS` or, for S3DIS-style rooms,
`S3DIS_ROOM_WEIGHTS`), a size from the type's `RoomRecipe`, an outline (rectangular, or an
L for rooms at least 3.5 m across, 35% of the time) and a height of 2.5-3 m. It then adds
doors and windows, for S3DIS style sometimes columns, every furniture group of the recipe
(each a number of times drawn from its range, against a wall, free-standing or in a
corner) and things hung on the walls (pictures, whiteboards, towels). A group that does
not fit is redrawn a few times (more often when the recipe requires it) and otherwise
left out. Finally `room_shell` adds the floor, one object per wall with the openings
cut out, and for S3DIS the ceiling and sometimes beams (ScanNet meshes have no ceiling).

S3DIS room types reuse the ScanNet recipes where they are alike (an S3DIS office is a
ScanNet office; desks then become S3DIS tables and most furniture clutter, through
`categories.RAW_CATEGORIES`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from dknet_jax.synthetic import furniture, groups
from dknet_jax.synthetic.appearance import draw_color
from dknet_jax.synthetic.furniture import Part, SceneObject, uniform
from dknet_jax.synthetic.layout import RoomLayout
from dknet_jax.synthetic.primitives import Box, Sheet

# Where a furniture group goes.
WALL, FREE, ANY, CORNER = "wall", "free", "any", "corner"  # ANY: wall or free, 50:50


class RoomRecipe(NamedTuple):
    """What a room type contains.

    width, depth: ranges in metres (the two are swapped half of the time).
    windows: (min, max) number of windows.
    curtain_p: probability that a window has curtains.
    groups: (group builder, where, min count, max count) in placement order; a builder
      takes the rng and returns a list of objects (see `groups.py`).
    wall_items: (raw category, min count, max count) of boards hung on the walls.
    """

    width: tuple[float, float]
    depth: tuple[float, float]
    windows: tuple[int, int]
    curtain_p: float
    groups: list[tuple[Callable, str, int, int]]
    wall_items: list[tuple[str, int, int]]


ROOMS = {
    "bedroom": RoomRecipe(
        width=(3, 5),
        depth=(3, 5),
        windows=(1, 2),
        curtain_p=0.7,
        groups=[
            (groups.bed_with_nightstands, WALL, 1, 1),
            (groups.cabinet, WALL, 0, 2),
            (groups.workstation, WALL, 0, 1),
            (groups.bookshelf, WALL, 0, 1),
            (groups.box_stack, ANY, 0, 2),
            (groups.trash_can, ANY, 0, 1),
            (groups.backpack, ANY, 0, 1),
            (groups.floor_lamp, ANY, 0, 1),
        ],
        wall_items=[("picture", 0, 3)],
    ),
    "living_room": RoomRecipe(
        width=(4, 8),
        depth=(3.5, 6),
        windows=(1, 3),
        curtain_p=0.6,
        groups=[
            (groups.sofa_group, ANY, 1, 2),
            (groups.tv_on_stand, WALL, 0, 1),
            (groups.bookshelf, WALL, 0, 2),
            (groups.cabinet, WALL, 0, 1),
            (groups.table_with_chairs, FREE, 0, 1),
            (groups.loose_chair, FREE, 0, 2),
            (groups.ottoman, FREE, 0, 1),
            (groups.floor_lamp, ANY, 0, 1),
            (groups.box_stack, ANY, 0, 1),
        ],
        wall_items=[("picture", 1, 3)],
    ),
    "office": RoomRecipe(
        width=(3, 7),
        depth=(3, 6),
        windows=(1, 3),
        curtain_p=0.2,
        groups=[
            (groups.workstation, WALL, 1, 4),
            (groups.table_with_chairs, FREE, 0, 1),
            (groups.bookshelf, WALL, 0, 2),
            (groups.cabinet, WALL, 0, 3),
            (groups.trash_can, ANY, 0, 2),
            (groups.box_stack, ANY, 0, 3),
            (groups.backpack, ANY, 0, 2),
            (groups.loose_chair, FREE, 0, 1),
        ],
        wall_items=[("whiteboard", 0, 1), ("picture", 0, 2)],
    ),
    "kitchen": RoomRecipe(
        width=(3, 6),
        depth=(3, 5),
        windows=(1, 2),
        curtain_p=0.3,
        groups=[
            (groups.kitchen_counter, WALL, 1, 2),
            (groups.refrigerator, WALL, 1, 1),
            (groups.table_with_chairs, FREE, 0, 1),
            (groups.cabinet, WALL, 0, 1),
            (groups.trash_can, ANY, 0, 1),
        ],
        wall_items=[("picture", 0, 1)],
    ),
    "bathroom": RoomRecipe(
        width=(2.8, 4),
        depth=(2.8, 3.6),
        windows=(0, 1),
        curtain_p=0.2,
        groups=[
            (groups.bathtub, CORNER, 0, 1),
            (groups.toilet, WALL, 1, 1),
            (groups.washbasin, WALL, 1, 2),
            (groups.cabinet, WALL, 0, 1),
            (groups.trash_can, ANY, 0, 1),
        ],
        wall_items=[("towel", 0, 2)],
    ),
    "conference_room": RoomRecipe(
        width=(5, 8),
        depth=(4, 6),
        windows=(1, 3),
        curtain_p=0.4,
        groups=[
            (groups.conference_table, FREE, 1, 1),
            (groups.cabinet, WALL, 0, 2),
            (groups.tv_on_stand, WALL, 0, 1),
            (groups.trash_can, ANY, 0, 1),
            (groups.loose_chair, ANY, 0, 2),
        ],
        wall_items=[("whiteboard", 0, 1), ("picture", 0, 2)],
    ),
}
ROOM_WEIGHTS = {"office": 1.4, "bedroom": 1.2, "living_room": 1.2, "conference_room": 0.8}
# S3DIS: mostly offices and hallways, as in the real areas
S3DIS_ROOM_WEIGHTS = {
    "office": 3.0,
    "hallway": 1.5,
    "conferenceRoom": 0.8,
    "storage": 0.6,
    "WC": 0.6,
    "lounge": 0.4,
    "pantry": 0.3,
}
S3DIS_ROOMS = {
    "office": ROOMS["office"],
    "conferenceRoom": ROOMS["conference_room"],
    "hallway": RoomRecipe(
        width=(1.8, 2.6),
        depth=(5, 9),
        windows=(0, 1),
        curtain_p=0.0,
        groups=[
            (groups.cabinet, WALL, 0, 1),
            (groups.box_stack, ANY, 0, 2),
            (groups.bookshelf, WALL, 0, 1),
            (groups.trash_can, ANY, 0, 1),
        ],
        wall_items=[("whiteboard", 0, 1)],
    ),
    "lounge": ROOMS["living_room"],
    "storage": RoomRecipe(
        width=(3, 5),
        depth=(3, 5),
        windows=(0, 1),
        curtain_p=0.0,
        groups=[
            (groups.bookshelf, WALL, 2, 4),
            (groups.cabinet, WALL, 0, 2),
            (groups.box_stack, ANY, 2, 5),
        ],
        wall_items=[],
    ),
    "WC": ROOMS["bathroom"],
    "pantry": ROOMS["kitchen"],
}
# raw category -> ranges of (height of the bottom edge, width, height, thickness), metres
WALL_ITEMS = {
    "picture": ((1.1, 1.8), (0.3, 1.0), (0.3, 0.8), (0.02, 0.04)),
    "whiteboard": ((0.8, 1.0), (1.2, 2.4), (0.9, 1.2), (0.015, 0.03)),
    "towel": ((0.9, 1.3), (0.3, 0.6), (0.4, 0.7), (0.02, 0.04)),
}


def _hang_on_wall(lay: RoomLayout, category: str) -> bool:
    """Hang one board of a `WALL_ITEMS` category on a random wall, just off it."""
    rng = lay.rng
    z_range, w_range, h_range, t_range = WALL_ITEMS[category]
    w, h = uniform(rng, *w_range), uniform(rng, *h_range)
    z0 = uniform(rng, z_range[0], max(z_range[0], min(z_range[1], lay.height - 0.1) - h))
    obj = furniture.upright_board(rng, category, w, h, uniform(rng, *t_range), z0)
    return lay.place_against_wall([obj], gap=(0.003, 0.015))


def _place_group(lay: RoomLayout, objects: list[SceneObject], where: str) -> bool:
    if where == ANY:
        where = WALL if lay.rng.random() < 0.5 else FREE
    if where == FREE:
        return lay.place_free_standing(objects)
    return lay.place_against_wall(objects, corner=where == CORNER)


def room_shell(lay: RoomLayout, ceiling: bool) -> list[SceneObject]:
    """The floor (with the L's notch cut out), one object per wall (with its door and
    window openings cut out) and, when ``ceiling``, the ceiling and sometimes beams."""
    rng, w, d, h = lay.rng, lay.width, lay.depth, lay.height
    holes = () if lay.notch is None else ((lay.notch[0], w + 1, lay.notch[2], d + 1),)
    floor = "floor " + str(rng.choice(["wood", "carpet", "tile"]))
    out = [
        SceneObject(
            "floor", [Part(Sheet((0, 0, 0), (w, 0, 0), (0, d, 0), holes), draw_color(rng, floor))]
        )
    ]
    wall_color = draw_color(rng, "wall")
    for wall in lay.walls:
        # the wall sheet runs from p1 back to p0, so that it faces into the room; its
        # openings are then measured from p1
        length = wall.length
        openings = tuple((length - s1, length - s0, z0, z1) for s0, s1, z0, z1 in wall.holes)
        out.append(
            SceneObject(
                "wall",
                [
                    Part(
                        Sheet((*wall.p1, 0.0), (*(wall.p0 - wall.p1), 0.0), (0, 0, h), openings),
                        wall_color * uniform(rng, 0.95, 1.05),
                    )
                ],
            )
        )
    if ceiling:
        notch = () if lay.notch is None else ((lay.notch[0], w + 1, -1, d - lay.notch[2]),)
        out.append(
            SceneObject(
                "ceiling", [Part(Sheet((0, d, h), (w, 0, 0), (0, -d, 0), notch), wall_color)]
            )
        )
        x0, y0, x1, y1 = lay.floor_rects[0]
        for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.4 else 0):
            beam_w, beam_d = uniform(rng, 0.3, 0.5), uniform(rng, 0.3, 0.6)
            yc = uniform(rng, y0 + 0.3, y1 - 0.3 - beam_w)
            out.append(
                SceneObject(
                    "beam",
                    [Part(Box((x0, yc, h - beam_d), (x1, yc + beam_w, h), "+z-x+x"), wall_color)],
                )
            )
    return out


def layout_room(
    rng: np.random.Generator, style: str = "scannet"
) -> tuple[list[SceneObject], RoomLayout, str]:
    """Draw a room of ScanNet or S3DIS style and furnish it.

    Returns:
      (objects with room poses: the shell first, then everything placed; the
      `RoomLayout`; the room type, a `ROOMS` or `S3DIS_ROOMS` key).
    """
    if style not in ("scannet", "s3dis"):
        raise ValueError(f"layout_room: style must be 'scannet' or 's3dis', got {style!r}")
    recipes = ROOMS if style == "scannet" else S3DIS_ROOMS
    names = sorted(recipes)
    weight_of = ROOM_WEIGHTS if style == "scannet" else S3DIS_ROOM_WEIGHTS
    weights = np.array([weight_of.get(n, 1.0) for n in names])
    room_type = str(rng.choice(names, p=weights / weights.sum()))
    recipe = recipes[room_type]
    w, d = uniform(rng, *recipe.width), uniform(rng, *recipe.depth)
    if rng.random() < 0.5:
        w, d = d, w
    l_shaped = min(w, d) >= 3.5 and rng.random() < 0.35
    lay = RoomLayout(rng, w, d, uniform(rng, 2.5, 3.0), l_shaped)
    for _ in range(1 + int(rng.random() < (0.6 if room_type == "hallway" else 0.25))):
        lay.add_door()
    for _ in range(int(rng.integers(recipe.windows[0], recipe.windows[1] + 1))):
        lay.add_window(curtains=rng.random() < recipe.curtain_p)
    if style == "s3dis" and rng.random() < 0.4:
        for _ in range(int(rng.integers(1, 3))):
            lay.place_against_wall(
                groups.column(rng, lay.height), corner=rng.random() < 0.5, gap=(0, 0)
            )
    for build, where, lo, hi in recipe.groups:
        for _ in range(int(rng.integers(lo, hi + 1))):
            # redraw a group that won't fit; a room's must-haves get more chances
            any(_place_group(lay, build(rng), where) for _ in range(8 if lo else 3))
    for category, lo, hi in recipe.wall_items:
        for _ in range(int(rng.integers(lo, hi + 1))):
            _hang_on_wall(lay, category)
    return room_shell(lay, ceiling=style == "s3dis") + lay.objects, lay, room_type
