"""Furniture groups: the arrangements a room is furnished with, placed as one unit.

A group builder takes the random generator and returns a list of `SceneObject`s posed in
one common group frame, with the same convention as a single piece (x centred, back at
y = 0, z up): a table with chairs round it, a desk with its chair, monitor and lamp, a
bed between nightstands, a row of kitchen cabinets under a counter with a sink. The room
layout (`layout.RoomLayout`) then places the whole group against a wall or free-standing,
so the pieces keep their arrangement: chairs touch the table but never pass through it.

Sets of like objects (the chairs round a table, a row of kitchen cabinets, a pair of
nightstands) share one finish (`share_finish`), as real sets do. Single pieces are
wrapped as one-object groups so that every entry of a room recipe (`rooms.py`) is called
the same way.
"""

from __future__ import annotations

import numpy as np

from dknet_jax.synthetic import furniture
from dknet_jax.synthetic.appearance import draw_color
from dknet_jax.synthetic.furniture import Part, SceneObject, group_bounds, uniform
from dknet_jax.synthetic.primitives import Box


def placed(
    o: SceneObject, yaw: float = 0.0, x: float = 0.0, y: float = 0.0, z: float = 0.0
) -> SceneObject:
    """Set an object's pose in its group frame; returns the object."""
    o.pose = (yaw, x, y, z)
    return o


def share_finish(objects: list[SceneObject]) -> None:
    """Give a set of like objects the colours of the first, part by part.

    Each object has already drawn its own colours, so the random stream (and everything
    drawn after it) is the same as without matching.
    """
    for o in objects[1:]:
        o.parts = [
            p._replace(color=ref.color) for p, ref in zip(o.parts, objects[0].parts, strict=True)
        ]


def chair_facing(
    rng, office: bool, x: float, y_edge: float, side: int, offset: float
) -> SceneObject:
    """A chair at ``x`` whose front edge is ``offset`` beyond the line y = y_edge
    (negative: tucked under a table top). side = +1: the chair stands beyond the line and
    looks back at it; side = -1: it stands before the line looking forward."""
    c = furniture.chair(rng, office)
    d = group_bounds([c])[1][1]
    if side > 0:
        return placed(c, np.pi, x, y_edge + offset + d)
    return placed(c, 0.0, x, y_edge - offset - d)


# ---------------------------------------------------------------------------------------
# Groups of several objects
def table_with_chairs(rng, conference: bool = False) -> list[SceneObject]:
    """A table with chairs along its long sides (tucked in or pulled out) and maybe at
    its ends; a conference table is bigger and its chairs are office chairs."""
    w = uniform(rng, 2.0, 3.6) if conference else uniform(rng, 0.8, 1.8)
    d = uniform(rng, 1.0, 1.4) if conference else uniform(rng, 0.7, 1.0)
    objs, office = [furniture.table(rng, w=w, d=d)], conference or rng.random() < 0.3
    per_side = 1 if w < 1.5 else (2 if w < 2.2 else 3)
    for side, y_edge in ((1, d), (-1, 0.0)):
        for k in range(per_side):
            if rng.random() < 0.8:
                x = (k + 0.5) * w / per_side - w / 2 + rng.normal(0, 0.02)
                objs.append(chair_facing(rng, office, x, y_edge, side, uniform(rng, -0.12, 0.1)))
    for sx in (-1, 1):  # chairs at the ends, turned to face the table
        if rng.random() < (0.6 if conference else 0.25):
            c = furniture.chair(rng, office)
            depth = group_bounds([c])[1][1]
            off = uniform(rng, 0.0, 0.08)
            objs.append(placed(c, -sx * np.pi / 2, sx * (w / 2 + off + depth), d / 2))
    share_finish(objs[1:])
    return objs


def conference_table(rng) -> list[SceneObject]:
    """`table_with_chairs` for a conference room."""
    return table_with_chairs(rng, conference=True)


def workstation(rng) -> list[SceneObject]:
    """A desk, usually with an office chair in its knee space, maybe a monitor and a
    table lamp on it."""
    dk = furniture.desk(rng)
    lo, hi = group_bounds([dk])
    w, d, height = hi[0] - lo[0], hi[1], hi[2]
    drawer = len(dk.parts) > 4
    objs = [dk]
    if rng.random() < 0.85:
        # in the middle of the knee space (left of the drawer block when there is one)
        x = (-w / 2 + 0.03 + w / 2 - 0.45) / 2 if drawer else 0.0
        objs.append(chair_facing(rng, True, x, d, 1, uniform(rng, -0.05, 0.15)))
    if rng.random() < 0.7:
        objs.append(placed(furniture.monitor(rng, height), 0, uniform(rng, -0.1, 0.1) * w, 0.04))
    if rng.random() < 0.4:
        objs.append(
            placed(
                furniture.lamp(rng, height, floor=False),
                0,
                float(rng.choice([-1, 1])) * (w / 2 - 0.16),
                d - 0.2,
            )
        )
    return objs


def bed_with_nightstands(rng) -> list[SceneObject]:
    """A bed with its pillows, nightstands beside it (a matching pair when both are
    there) and maybe a table lamp on each."""
    objs = furniture.bed_with_pillows(rng)
    w = group_bounds(objs[:1])[1][0] * 2
    for sx in (-1, 1):
        if rng.random() < 0.6:
            nw, nd, nh = uniform(rng, 0.4, 0.55), uniform(rng, 0.35, 0.45), uniform(rng, 0.45, 0.6)
            x = sx * (w / 2 + uniform(rng, 0, 0.03) + nw / 2)
            stand = furniture.back_to_wall(furniture.box_object(rng, "nightstand", nw, nd, nh), nh)
            objs.append(placed(stand, 0, x, 0))
            if rng.random() < 0.5:
                objs.append(placed(furniture.lamp(rng, nh, floor=False), 0, x, nd / 2))
    share_finish([o for o in objs if o.category == "nightstand"])
    return objs


def sofa_group(rng) -> list[SceneObject]:
    """A couch, maybe two cushions leaning on its back, maybe a coffee table in front."""
    couch = furniture.sofa(rng)
    lo, hi = group_bounds([couch])
    objs = [couch]
    if rng.random() < 0.5:  # cushions lean on the back
        for sx in (-1, 1):
            x = sx * (hi[0] - 0.6)
            objs.append(
                SceneObject(
                    "pillow",
                    [
                        Part(
                            Box((x - 0.2, 0.2, 0.45), (x + 0.2, 0.32, 0.8), "-z"),
                            draw_color(rng, "cushion"),
                        )
                    ],
                )
            )
    if rng.random() < 0.6:
        objs.append(
            placed(
                furniture.table(
                    rng, "coffee table", w=uniform(rng, 0.8, 1.3), d=uniform(rng, 0.5, 0.7)
                ),
                0,
                0,
                hi[1] + uniform(rng, 0.3, 0.5),
            )
        )
    return objs


def tv_on_stand(rng) -> list[SceneObject]:
    """A low tv stand against the wall and a flat tv standing on it."""
    w, d, h = uniform(rng, 1.0, 1.8), uniform(rng, 0.35, 0.5), uniform(rng, 0.4, 0.6)
    stand = furniture.back_to_wall(furniture.box_object(rng, "tv stand", w, d, h), h)
    tv_w = min(w, uniform(rng, 0.9, 1.4))
    return [stand, furniture.upright_board(rng, "tv", tv_w, tv_w * 0.58, 0.05, h, y0=0.08)]


def kitchen_counter(rng) -> list[SceneObject]:
    """Kitchen cabinets in a row under a counter top, a sink set into it and maybe a
    microwave on it."""
    length, height, depth = uniform(rng, 1.2, 3.0), 0.86, uniform(rng, 0.55, 0.6)
    n = int(np.ceil(length / 0.6))
    cab_w = length / n
    objs = [
        placed(
            furniture.cabinet(rng, "kitchen cabinets", w=cab_w - 0.002, d=depth, height=height),
            0,
            -length / 2 + (k + 0.5) * cab_w,
        )
        for k in range(n)
    ]
    share_finish(objs)
    top = SceneObject(
        "kitchen counter" if rng.random() < 0.5 else "counter",
        [
            Part(
                Box(
                    (-length / 2 - 0.01, 0, height),
                    (length / 2 + 0.01, depth + 0.03, height + 0.04),
                    "-y",
                ),
                draw_color(rng, "counter"),
            )
        ],
        occluders=[
            Box((-length / 2 + 0.03, -0.3, height), (length / 2 - 0.03, 0.05, height + 0.02))
        ],
    )
    objs.append(top)
    sink_w = uniform(rng, 0.5, 0.7)
    sink_x = uniform(rng, -length / 2 + sink_w / 2 + 0.05, length / 2 - sink_w / 2 - 0.05)
    objs.append(
        placed(
            furniture.basin(rng, sink_w, uniform(rng, 0.38, 0.45), height + 0.04, 0.12),
            0,
            sink_x,
            0.08,
        )
    )
    if rng.random() < 0.5 and length > 1.6:  # at the end away from the sink
        mx = -np.sign(sink_x) * (length / 2 - 0.35) if sink_x else length / 2 - 0.35
        objs.append(
            placed(
                furniture.box_object(rng, "microwave", 0.48, 0.36, 0.28, z0=height + 0.04),
                0,
                mx,
                0.05,
            )
        )
    return objs


def washbasin(rng) -> list[SceneObject]:
    """A bathroom sink (on a pedestal, or set into a low cabinet) and often a mirror
    above it."""
    if rng.random() < 0.5:
        objs = [furniture.pedestal_sink(rng)]
        top = 0.87
    else:
        w, d = uniform(rng, 0.6, 1.0), uniform(rng, 0.45, 0.55)
        objs = [
            furniture.cabinet(rng, "cabinet", w=w, d=d, height=0.78),
            furniture.basin(rng, w - 0.1, d - 0.1, 0.78, 0.12),
        ]
        objs[1].pose = (0.0, 0.0, 0.03, 0.0)
        top = 0.9
    if rng.random() < 0.7:
        objs.append(
            furniture.upright_board(
                rng,
                "mirror",
                uniform(rng, 0.5, 0.8),
                uniform(rng, 0.6, 0.9),
                0.02,
                top + uniform(rng, 0.2, 0.35),
                y0=0.005,
            )
        )
    return objs


def box_stack(rng) -> list[SceneObject]:
    """One to three cardboard boxes stacked a little askew (only the bottom one hides
    floor)."""
    objs, z = [], 0.0
    for _ in range(int(rng.integers(1, 4))):
        w, d, h = uniform(rng, 0.25, 0.6), uniform(rng, 0.25, 0.5), uniform(rng, 0.2, 0.45)
        objs.append(
            placed(
                furniture.box_object(rng, "box", w, d, h),
                0,
                rng.normal(0, 0.03),
                rng.normal(0, 0.03),
                z,
            )
        )
        objs[-1].occluders = objs[-1].occluders if z == 0 else []
        z += h
        if rng.random() < 0.5:
            break
    return objs


# ---------------------------------------------------------------------------------------
# One-object groups
def column(rng, height: float) -> list[SceneObject]:
    """A rectangular column from floor to ceiling, painted like the walls (S3DIS rooms)."""
    w, d = uniform(rng, 0.3, 0.6), uniform(rng, 0.3, 0.6)
    return [
        SceneObject(
            "column",
            [Part(Box((-w / 2, 0, 0), (w / 2, d, height), "-z+z-y"), draw_color(rng, "wall"))],
        )
    ]


def refrigerator(rng) -> list[SceneObject]:
    """A fridge against the wall."""
    h = uniform(rng, 1.6, 1.9)
    return [
        furniture.back_to_wall(
            furniture.box_object(
                rng, "refrigerator", uniform(rng, 0.6, 0.8), uniform(rng, 0.65, 0.75), h
            ),
            h,
        )
    ]


def backpack(rng) -> list[SceneObject]:
    """A backpack standing on the floor."""
    return [
        furniture.box_object(
            rng,
            "backpack",
            uniform(rng, 0.28, 0.35),
            uniform(rng, 0.15, 0.22),
            uniform(rng, 0.35, 0.45),
        )
    ]


def ottoman(rng) -> list[SceneObject]:
    """A footstool."""
    return [
        furniture.box_object(
            rng, "ottoman", uniform(rng, 0.4, 0.6), uniform(rng, 0.4, 0.6), uniform(rng, 0.35, 0.45)
        )
    ]


def toilet(rng) -> list[SceneObject]:
    """A toilet."""
    return [furniture.toilet(rng)]


def bookshelf(rng) -> list[SceneObject]:
    """A bookshelf with its books."""
    return furniture.bookshelf_with_books(rng)


def cabinet(rng) -> list[SceneObject]:
    """A cabinet or a file cabinet."""
    return [furniture.cabinet(rng, str(rng.choice(["cabinet", "file cabinet"])))]


def floor_lamp(rng) -> list[SceneObject]:
    """A floor lamp."""
    return [furniture.lamp(rng)]


def trash_can(rng) -> list[SceneObject]:
    """A bin."""
    return [furniture.trash_can(rng)]


def loose_chair(rng) -> list[SceneObject]:
    """A chair on its own (an office chair 30% of the time)."""
    return [furniture.chair(rng, rng.random() < 0.3)]


def bathtub(rng) -> list[SceneObject]:
    """A bathtub, often with a shower curtain."""
    return furniture.bathtub_with_curtain(rng)
