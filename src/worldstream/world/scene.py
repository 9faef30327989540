"""Procedural 3D worlds rendered by ray casting in torch: training clips with exact camera poses.

This module owns the synthetic world: what a scene is made of (`Scene`, `make_scene`), how a camera sees
it (`render`), random keyboard schedules (`random_actions`) and whole clips (`render_clip`). The camera
follows `worldstream.models.camera`: OpenCV camera-to-world poses (x right, y DOWN, z forward),
intrinsics (fx, fy, cx, cy) of a 480×832 image rescaled to the render size, keyboard trajectories from
`trajectory_from_actions`.

The world, in world coordinates (the camera starts at the origin looking along +z):
- a ground plane at y = +1.5 (1.5 below the start; y points down) with a texture fixed in the world:
  checker tiles, grid lines and low-frequency colour noise, so motion parallax is visible;
- a sky that depends on the viewing direction only (infinitely far): a horizon→zenith gradient, a sun
  (or moon) disc with glow, and soft clouds; palettes by time of day (dawn, noon, dusk, night);
- a few dozen axis-aligned boxes and columns standing on the ground, 3..40 units from the start;
- Lambert sun shading with a hemisphere ambient term, hard sun shadows cast by the boxes, and
  exponential distance fog that fades into the sky colour at the horizon.

Rendering casts one ray per pixel centre (col + 0.5, row + 0.5) (or s×s sub-pixel rays when
supersampling), intersects the ground analytically and the boxes with the slab method, vectorised over
rays × boxes, in chunks of rays so memory stays bounded; per frame only the boxes inside the view pyramid
(and those whose shadows can reach into it) are tested. It runs on CPU and CUDA. Everything is seeded:
the same seed gives bit-identical frames on the same device (CPU and CUDA agree to ~4e-6).

Speed, one 33-frame 96×160 clip with 2×2 supersampling and shadows: ~1.5 s on a 2-core CPU (two threads,
otherwise idle), ~2.4 s on one thread; ~0.5 s without supersampling. On an H200 ~0.2 s, and an 81-frame
480×832 clip ~2 s. When other processes share the CPU, torch's multi-threaded small ops stall (10x slower
seen): render on one thread per process then (torch.set_num_threads(1), as DataLoader workers do).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from worldstream.models.camera import (DEFAULT_INTRINSICS, WASD, parse_action_string, scale_intrinsics,
                                       trajectory_from_actions)

# ----------------------------------------------------------------------------------------------------
# World layout

GROUND_Y = 1.5                    # ground plane height (y points down: the ground is 1.5 below the start)
NUM_BOXES = (24, 48)              # a scene has between these many boxes (inclusive)
BOX_DISTANCE = (3.0, 40.0)        # a footprint's circumscribed circle lies this far (xz) from the start
FORWARD_BOXES = 4                 # of them, this many are placed in front of the start camera ...
FORWARD_HALF_ANGLE_DEG = 35.0     # ... within this angle of +z ...
FORWARD_DISTANCE = (4.0, 14.0)    # ... at this distance
BOX_FOOTPRINT = (0.4, 2.5)        # side lengths (x, z) of an ordinary box
BOX_HEIGHT = (0.3, 3.0)
COLUMN_FOOTPRINT = (0.3, 0.8)     # columns: thin and tall
COLUMN_HEIGHT = (2.0, 6.0)
TILE_SIZE = (0.75, 1.5)           # checker tile side on the ground
NOISE_WAVES = 4                   # sinusoids in the ground colour noise
CLOUD_WAVES = 10                  # sinusoids in the clouds (more: less regular)
NOISE_WAVELENGTH = (4.0, 20.0)    # world units: low frequency compared to the tiles
NOISE_STRENGTH = (0.1, 0.25)      # relative brightness change of the ground noise, per channel
CLOUD_WAVELENGTH = (0.3, 3.0)     # in sky-plane units (direction.xz / elevation), log-uniform
COLOUR_JITTER = 0.08              # palette colours are scaled by 1 ± this, per channel

# Rendering constants
LINE_HALF_WIDTH = 0.035           # grid line half width, in tiles
LINE_DARKEN = 0.55                # grid lines: tile colour times this
TEXTURE_FADE_DISTANCE = 30.0      # checker/line contrast falls as exp(-distance / this): cheap anti-aliasing
SKY_GRADIENT_POWER = 0.5          # horizon→zenith blend = elevation ** this
SUN_ANGULAR_RADIUS_DEG = 2.5
SUN_GLOW = 0.35                   # glow strength around the sun ...
SUN_GLOW_EXPONENT = 12.0          # ... and how tight it is (cos(angle) ** this)
CLOUD_HORIZON_BIAS = 0.15         # keeps sky-plane coordinates finite at the horizon
CLOUD_FADE_ELEVATION = 0.2        # clouds fade out below this elevation (sin of the angle)
CLOUD_THRESHOLD = (2.0, -1.0)     # cloud where the (unit-variance) noise exceeds this: cover 0 .. cover 1
CLOUD_SOFTNESS = 0.8              # noise range over which a cloud's edge goes from clear to opaque
AMBIENT_SIDE = 0.75               # hemisphere ambient: vertical faces get this fraction of what tops get
SHADOW_OFFSET = 1e-3              # shadow rays start this far off the surface
RAY_EPS = 1e-6                    # hits closer than this are ignored; |direction| components floor
MAX_RAY_BOX_ELEMENTS = 1 << 21    # rays × boxes per chunk (bounds memory: ~10 temporaries of this × 3 floats)
SMALL_IMAGE_PIXELS = 128 * 1024   # images up to this size are 2×2 supersampled by default
DEFAULT_SUPERSAMPLE = 2
FOGGY_DENSITY = 0.045             # describe(): fog denser than this reads as "foggy"
CLOUDY_COVER = 0.65               # describe(): cloud cover above this reads as "cloudy"
COLUMN_ASPECT = 2.5               # describe(): a box taller than this × its width counts as a column


# Times of day: sky colours, sun colour and elevation range (degrees), ambient strength, fog density range.
PALETTES = {
    "dawn": dict(zenith=(0.38, 0.48, 0.72), horizon=(0.96, 0.72, 0.58), sun=(1.0, 0.78, 0.56),
                 elevation=(6.0, 18.0), ambient=0.38, fog=(0.02, 0.05), cloud=(0.95, 0.78, 0.72)),
    "noon": dict(zenith=(0.22, 0.45, 0.88), horizon=(0.72, 0.83, 0.95), sun=(1.0, 0.97, 0.9),
                 elevation=(50.0, 75.0), ambient=0.42, fog=(0.01, 0.03), cloud=(0.97, 0.97, 0.98)),
    "dusk": dict(zenith=(0.18, 0.18, 0.42), horizon=(0.95, 0.52, 0.32), sun=(1.0, 0.56, 0.3),
                 elevation=(3.0, 12.0), ambient=0.32, fog=(0.02, 0.05), cloud=(0.75, 0.45, 0.45)),
    "night": dict(zenith=(0.01, 0.02, 0.07), horizon=(0.07, 0.09, 0.17), sun=(0.4, 0.45, 0.6),
                  elevation=(25.0, 55.0), ambient=0.16, fog=(0.03, 0.06), cloud=(0.12, 0.13, 0.18)),
}
TIME_WORDS = {
    "dawn": ("dawn", "sunrise", "morning", "daybreak"),
    "noon": ("noon", "midday", "sunny", "daytime", "afternoon"),
    "dusk": ("dusk", "sunset", "evening", "twilight"),
    "night": ("night", "moon", "moonlit", "midnight", "dark"),
}
# Weather a prompt can ask for (else it comes from the seed): fog density and cloud cover ranges.
WEATHER_WORDS = {
    "foggy": ("fog", "foggy", "mist", "misty", "haze", "hazy"),
    "cloudy": ("cloud", "clouds", "cloudy", "overcast"),
    "clear": ("clear", "cloudless"),
}
FOGGY_FOG = (0.06, 0.1)           # fog density a "foggy" prompt gets
CLOUDY_COVER_RANGE = (0.7, 1.0)   # cloud cover a "cloudy" prompt gets
CLEAR_COVER_RANGE = (0.0, 0.3)    # and a "clear" one
# Ground styles: two tile colours; the prompt's words for them.
GROUNDS = {
    "grass": dict(tiles=((0.26, 0.48, 0.18), (0.36, 0.58, 0.24)), words=("grass", "grassy", "meadow", "field")),
    "sand": dict(tiles=((0.80, 0.70, 0.50), (0.68, 0.57, 0.40)), words=("sand", "sandy", "desert", "beach")),
    "snow": dict(tiles=((0.92, 0.93, 0.96), (0.78, 0.81, 0.88)), words=("snow", "snowy", "ice", "winter")),
    "tiles": dict(tiles=((0.62, 0.60, 0.58), (0.38, 0.38, 0.40)), words=("tile", "tiles", "tiled", "plaza", "stone")),
}
GROUND_NAMES = {"grass": "grassy field", "sand": "sandy plain", "snow": "snowy field", "tiles": "tiled plaza"}
# Box styles: (saturation range, value range) in HSV; hue is uniform. The prompt's words for them.
BOX_STYLES = {
    "colourful": ((0.55, 0.9), (0.55, 0.95)),
    "pastel": ((0.2, 0.4), (0.8, 0.95)),
    "grey": ((0.0, 0.08), (0.35, 0.75)),
}
BOX_STYLE_WORDS = {"colourful": ("colourful", "colorful", "vivid"), "pastel": ("pastel",),
                   "grey": ("grey", "gray", "concrete")}


# ----------------------------------------------------------------------------------------------------
# Scene

@dataclass
class Scene:
    """All parameters of one world. Colours are RGB in [0, 1]; every tensor is float32."""
    time_of_day: str
    ground_style: str
    box_style: str
    sky_zenith: torch.Tensor       # [3]
    sky_horizon: torch.Tensor      # [3] also the fog colour
    sun_dir: torch.Tensor          # [3] unit vector towards the sun (y < 0: above the horizon)
    sun_color: torch.Tensor        # [3]
    ambient: torch.Tensor          # [3] ambient light reaching upward-facing surfaces
    fog_density: torch.Tensor      # [] fog = 1 − exp(−density · distance)
    cloud_color: torch.Tensor      # [3]
    cloud_cover: torch.Tensor      # [] 0 (clear) .. 1 (overcast)
    cloud_freq: torch.Tensor       # [K, 2] angular frequencies over the sky plane
    cloud_phase: torch.Tensor      # [K]
    tile_size: torch.Tensor        # []
    ground_colors: torch.Tensor    # [2, 3] the two checker colours
    noise_freq: torch.Tensor       # [K, 2] angular frequencies over world (x, z)
    noise_phase: torch.Tensor      # [K]
    noise_tint: torch.Tensor       # [3] per-channel strength of the ground colour noise
    box_min: torch.Tensor          # [B, 3] lower corners (x, y, z)
    box_max: torch.Tensor          # [B, 3] upper corners; box_max[:, 1] == GROUND_Y (boxes stand on the ground)
    box_color: torch.Tensor        # [B, 3]

    def to(self, device) -> "Scene":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def describe(self) -> str:
        """A short prompt built from the parameters, e.g. 'a sunny noon grassy field with colourful boxes'."""
        if self.fog_density.item() > FOGGY_DENSITY:
            weather = "foggy"
        elif self.cloud_cover.item() > CLOUDY_COVER:
            weather = "cloudy"
        elif self.time_of_day == "night":
            weather = "moonlit"
        else:
            weather = "sunny" if self.time_of_day == "noon" else "clear"
        heights = self.box_max[:, 1] - self.box_min[:, 1]
        widths = torch.maximum(self.box_max[:, 0] - self.box_min[:, 0], self.box_max[:, 2] - self.box_min[:, 2])
        columns = (heights > COLUMN_ASPECT * widths).float().mean().item() if len(heights) else 0.0
        shapes = "boxes" if columns < 0.15 else "boxes and columns" if columns < 0.6 else "columns"
        return f"a {weather} {self.time_of_day} {GROUND_NAMES[self.ground_style]} with {self.box_style} {shapes}"


def _pick_from_prompt(prompt: str | None, table: dict) -> str | None:
    """The first key of `table` (name -> words) whose words appear in the prompt, else None."""
    if not prompt:
        return None
    words = set("".join(c if c.isalpha() else " " for c in prompt.lower()).split())
    for name, names in table.items():
        if words & set(names):
            return name
    return None


def _uniform(g: torch.Generator, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=g)


def _jitter(g: torch.Generator, color) -> torch.Tensor:
    c = torch.tensor(color, dtype=torch.float32)
    return (c * _uniform(g, 1 - COLOUR_JITTER, 1 + COLOUR_JITTER, 3)).clamp(0, 1)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B] hue, saturation, value in [0, 1] -> [B, 3] RGB."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _direction(elevation_deg: torch.Tensor, azimuth: torch.Tensor) -> torch.Tensor:
    """Unit vector at an elevation above the horizon (y is down) and an azimuth from +z towards +x."""
    e = torch.deg2rad(elevation_deg)
    return torch.stack([torch.cos(e) * torch.sin(azimuth), -torch.sin(e), torch.cos(e) * torch.cos(azimuth)])


def _wave_frequencies(g: torch.Generator, count: int, wavelength: tuple[float, float]) -> torch.Tensor:
    """[count, 2] angular frequencies: random directions, wavelengths log-uniform in the given range."""
    angle = _uniform(g, 0, 2 * math.pi, count)
    length = torch.exp(_uniform(g, math.log(wavelength[0]), math.log(wavelength[1]), count))
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1) * (2 * math.pi / length)[:, None]


def _make_boxes(g: torch.Generator, style: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Box corners and colours: footprints around the start, each standing on the ground."""
    n = int(torch.randint(NUM_BOXES[0], NUM_BOXES[1] + 1, (1,), generator=g))
    column_fraction = _uniform(g, 0.0, 0.6, 1)
    is_column = torch.rand(n, generator=g) < column_fraction
    size_x = torch.where(is_column, _uniform(g, *COLUMN_FOOTPRINT, n), _uniform(g, *BOX_FOOTPRINT, n))
    size_z = torch.where(is_column, size_x, _uniform(g, *BOX_FOOTPRINT, n))
    height = torch.where(is_column, _uniform(g, *COLUMN_HEIGHT, n), _uniform(g, *BOX_HEIGHT, n))

    # Distance from the start to the footprint's circumscribed circle: uniform (so boxes thin out with
    # distance), the first FORWARD_BOXES in front of the camera. The centre sits a half diagonal further.
    distance = _uniform(g, *BOX_DISTANCE, n)
    azimuth = _uniform(g, 0, 2 * math.pi, n)
    k = min(FORWARD_BOXES, n)
    distance[:k] = _uniform(g, *FORWARD_DISTANCE, k)
    azimuth[:k] = math.radians(FORWARD_HALF_ANGLE_DEG) * _uniform(g, -1, 1, k)
    radius = distance + 0.5 * torch.sqrt(size_x ** 2 + size_z ** 2)
    cx, cz = radius * torch.sin(azimuth), radius * torch.cos(azimuth)

    box_min = torch.stack([cx - size_x / 2, GROUND_Y - height, cz - size_z / 2], dim=-1)
    box_max = torch.stack([cx + size_x / 2, torch.full_like(cx, GROUND_Y), cz + size_z / 2], dim=-1)
    sat, val = BOX_STYLES[style]
    color = _hsv_to_rgb(torch.rand(n, generator=g), _uniform(g, *sat, n), _uniform(g, *val, n))
    return box_min, box_max, color


def make_scene(seed: int, prompt: str | None = None) -> Scene:
    """A random world. Words in `prompt` may pick the time of day ("dawn", "noon", "dusk", "night", ...),
    the ground ("grass", "sand", "snow", "tiles", ...), the weather ("foggy", "cloudy", "clear") and the
    box colours ("colourful", "pastel", "grey");
    whatever it leaves open comes from the seed.
    Built on CPU with a seeded generator: the same (seed, prompt) always gives the same scene."""
    g = torch.Generator().manual_seed(int(seed))
    # Draw every random choice unconditionally, so a prompt changes only what it names.
    seeded_time = list(PALETTES)[int(torch.randint(len(PALETTES), (1,), generator=g))]
    seeded_ground = list(GROUNDS)[int(torch.randint(len(GROUNDS), (1,), generator=g))]
    seeded_boxes = list(BOX_STYLES)[int(torch.randint(len(BOX_STYLES), (1,), generator=g))]
    time_of_day = _pick_from_prompt(prompt, TIME_WORDS) or seeded_time
    ground_style = _pick_from_prompt(prompt, {k: v["words"] for k, v in GROUNDS.items()}) or seeded_ground
    box_style = _pick_from_prompt(prompt, BOX_STYLE_WORDS) or seeded_boxes

    pal = PALETTES[time_of_day]
    sky_zenith, sky_horizon = _jitter(g, pal["zenith"]), _jitter(g, pal["horizon"])
    sun_dir = _direction(_uniform(g, *pal["elevation"], 1)[0], _uniform(g, 0, 2 * math.pi, 1)[0])
    sky_light = (sky_zenith + sky_horizon) / 2
    ambient = pal["ambient"] * sky_light / sky_light.max()

    tiles = GROUNDS[ground_style]["tiles"]
    ground_colors = torch.stack([_jitter(g, tiles[0]), _jitter(g, tiles[1])])
    box_min, box_max, box_color = _make_boxes(g, box_style)

    u_fog, u_cloud = torch.rand(2, generator=g)                          # both drawn whatever the prompt says
    fog_range, cover_range = pal["fog"], (0.0, 1.0)
    weather = _pick_from_prompt(prompt, WEATHER_WORDS)
    if weather == "foggy":
        fog_range = FOGGY_FOG
    elif weather == "cloudy":
        cover_range = CLOUDY_COVER_RANGE
    elif weather == "clear":
        fog_range, cover_range = (pal["fog"][0], pal["fog"][0]), CLEAR_COVER_RANGE
    fog_density = fog_range[0] + (fog_range[1] - fog_range[0]) * u_fog
    cloud_cover = cover_range[0] + (cover_range[1] - cover_range[0]) * u_cloud
    return Scene(
        time_of_day=time_of_day, ground_style=ground_style, box_style=box_style,
        sky_zenith=sky_zenith, sky_horizon=sky_horizon, sun_dir=sun_dir, sun_color=_jitter(g, pal["sun"]),
        ambient=ambient, fog_density=fog_density, cloud_color=_jitter(g, pal["cloud"]), cloud_cover=cloud_cover,
        cloud_freq=_wave_frequencies(g, CLOUD_WAVES, CLOUD_WAVELENGTH),
        cloud_phase=_uniform(g, 0, 2 * math.pi, CLOUD_WAVES),
        tile_size=_uniform(g, *TILE_SIZE, 1)[0], ground_colors=ground_colors,
        noise_freq=_wave_frequencies(g, NOISE_WAVES, NOISE_WAVELENGTH),
        noise_phase=_uniform(g, 0, 2 * math.pi, NOISE_WAVES),
        noise_tint=_uniform(g, *NOISE_STRENGTH, 3),
        box_min=box_min, box_max=box_max, box_color=box_color,
    )


# ----------------------------------------------------------------------------------------------------
# Ray casting

def _waves(xy: torch.Tensor, freq: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Mean of sin(freq_k · xy + phase_k): smooth noise in [-1, 1], [R, 2] -> [R]."""
    return torch.sin(xy @ freq.T + phase).mean(dim=-1)


def intersect_boxes(origins: torch.Tensor, dirs: torch.Tensor, box_min: torch.Tensor, box_max: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest box hit along each ray (slab method), for boxes [B, 3] and rays given by origins and dirs,
    each [R, 3] or [1, 3] (one origin or one direction shared by all rays: the common cases, and cheaper).

    Returns (t [R], index [R], normal [R, 3]): distance in units of |dir| (inf on a miss), the box hit
    (-1 on a miss) and the outward normal of the face hit. Rays starting inside a box do not see it.
    """
    r = max(len(origins), len(dirs))
    device = box_min.device
    if len(box_min) == 0:
        return (torch.full((r,), math.inf, device=device), torch.full((r,), -1, device=device),
                torch.zeros(r, 3, device=device))
    safe = torch.where(dirs.abs() < RAY_EPS, torch.full_like(dirs, RAY_EPS), dirs)
    inv = 1.0 / safe
    if len(dirs) == 1:                      # one direction: (box − o)·inv = box·inv − o·inv
        t_lo = (box_min * inv)[None] - (origins * inv)[:, None]         # [R, B, 3]
        t_hi = (box_max * inv)[None] - (origins * inv)[:, None]
    else:
        t_lo = (box_min[None] - origins[:, None]) * inv[:, None]
        t_hi = (box_max[None] - origins[:, None]) * inv[:, None]
    t_enter = torch.minimum(t_lo, t_hi).amax(dim=-1)                    # [R, B]
    t_exit = torch.maximum(t_lo, t_hi).amin(dim=-1)
    hit = (t_enter <= t_exit) & (t_enter > RAY_EPS)
    t, index = torch.where(hit, t_enter, math.inf).min(dim=-1)          # [R]

    # The face entered is on the axis whose slab is entered last; recompute it for the box hit only.
    near = torch.where(safe > 0, box_min[index], box_max[index])         # [R, 3] the planes facing the ray
    axis = ((near - origins) * inv).argmax(dim=-1)
    normal = -torch.sign(safe) * F.one_hot(axis, 3).to(dirs.dtype)
    missed = torch.isinf(t)
    return t, torch.where(missed, -1, index), torch.where(missed[:, None], 0.0, normal)


def box_corners(box_min: torch.Tensor, box_max: torch.Tensor) -> torch.Tensor:
    """The 8 corners of each box, [B, 8, 3]."""
    pick = torch.tensor([[(c >> a) & 1 for a in range(3)] for c in range(8)], device=box_min.device).bool()
    return torch.where(pick[None], box_max[:, None], box_min[:, None])


def boxes_in_view(points: torch.Tensor, c2w: torch.Tensor, k: torch.Tensor, height: int, width: int
                  ) -> torch.Tensor:
    """Conservative frustum culling: [B] True unless all of a box's `points` [B, M, 3] (world) lie outside
    one side of the view pyramid of camera c2w [4, 4] with intrinsics k for a height×width image."""
    fx, fy, cx, cy = k.tolist()
    cam = (points - c2w[:3, 3]) @ c2w[:3, :3]                            # world -> camera coordinates
    x, y, z = cam.unbind(-1)
    outside = torch.stack([fx * x > (width - cx) * z, -fx * x > cx * z,  # right, left
                           fy * y > (height - cy) * z, -fy * y > cy * z])  # bottom, top
    return ~outside.all(dim=-1).any(dim=0)


def shadow_volume_points(scene: Scene) -> torch.Tensor:
    """[B, 16, 3]: each box's corners and their projections along the sunlight onto the ground. Their hull
    holds every point above the ground the box can shade, so it culls shadow casters like boxes_in_view."""
    corners = box_corners(scene.box_min, scene.box_max)
    sun_height = (-scene.sun_dir[1]).clamp(min=RAY_EPS)
    to_ground = (GROUND_Y - corners[..., 1:2]) / sun_height               # distance along −sun_dir
    return torch.cat([corners, corners - scene.sun_dir * to_ground], dim=1)


def sky_color(scene: Scene, dirs: torch.Tensor) -> torch.Tensor:
    """Sky seen along unit directions [R, 3] -> [R, 3]: gradient, sun disc and glow, clouds."""
    elevation = (-dirs[:, 1]).clamp(min=0)
    blend = elevation[:, None] ** SKY_GRADIENT_POWER
    sky = scene.sky_horizon + (scene.sky_zenith - scene.sky_horizon) * blend

    cos_sun = (dirs @ scene.sun_dir).clamp(min=0)
    cos_radius = math.cos(math.radians(SUN_ANGULAR_RADIUS_DEG))
    disc = ((cos_sun - cos_radius) / (1 - cos_radius) * 4).clamp(0, 1)   # soft-edged disc
    sky = sky + scene.sun_color * (SUN_GLOW * cos_sun ** SUN_GLOW_EXPONENT + disc)[:, None]

    # Clouds on a sky plane: coordinates depend on the direction only, so the sky does not move when the
    # camera translates, only when it turns.
    plane = dirs[:, [0, 2]] / (elevation + CLOUD_HORIZON_BIAS)[:, None]
    noise = _waves(plane, scene.cloud_freq, scene.cloud_phase) * math.sqrt(2 * len(scene.cloud_phase))  # ~unit variance
    threshold = CLOUD_THRESHOLD[0] + (CLOUD_THRESHOLD[1] - CLOUD_THRESHOLD[0]) * scene.cloud_cover
    density = ((noise - threshold) / CLOUD_SOFTNESS).clamp(0, 1)
    alpha = density * (elevation / CLOUD_FADE_ELEVATION).clamp(0, 1)
    return sky + (scene.cloud_color - sky) * alpha[:, None]


def ground_albedo(scene: Scene, points: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Ground colour at world points [R, 3] seen from `distance` [R] away -> [R, 3]."""
    uv = points[:, [0, 2]] / scene.tile_size
    cell = torch.floor(uv)
    checker = ((cell[:, 0] + cell[:, 1]) % 2)[:, None]
    colour = scene.ground_colors[0] + (scene.ground_colors[1] - scene.ground_colors[0]) * checker
    to_line = (uv - torch.round(uv)).abs().amin(dim=-1)
    colour = torch.where((to_line < LINE_HALF_WIDTH)[:, None], colour * LINE_DARKEN, colour)
    detail = torch.exp(-distance / TEXTURE_FADE_DISTANCE)[:, None]
    mean = scene.ground_colors.mean(dim=0)
    colour = mean + (colour - mean) * detail
    noise = _waves(points[:, [0, 2]], scene.noise_freq, scene.noise_phase)
    return colour * (1 + noise[:, None] * scene.noise_tint)


def shade(scene: Scene, origins: torch.Tensor, dirs: torch.Tensor,
          casters: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour [R, 3] in [0, 1] and distance [R] (inf for sky) of rays with unit directions dirs [R, 3] from
    origins [R, 3] or [1, 3]. Rays meet the ground and the scene's boxes; shadows are cast by the boxes
    `casters` = (box_min, box_max) (None: no shadows)."""
    down = dirs[:, 1]
    t_ground = torch.where(down > RAY_EPS, (GROUND_Y - origins[:, 1]) / down.clamp(min=RAY_EPS), math.inf)
    t_box, box, box_normal = intersect_boxes(origins, dirs, scene.box_min, scene.box_max)
    on_box = t_box < t_ground
    t = torch.minimum(t_ground, t_box)
    is_sky = torch.isinf(t)
    points = origins + dirs * torch.where(is_sky, 0.0, t)[:, None]

    up = torch.tensor([0.0, -1.0, 0.0], device=dirs.device)
    normal = torch.where(on_box[:, None], box_normal, up)
    albedo = ground_albedo(scene, points, t)
    if len(scene.box_color):
        albedo = torch.where(on_box[:, None], scene.box_color[box.clamp(min=0)], albedo)
    lambert = (normal @ scene.sun_dir).clamp(min=0)
    if casters is not None and len(casters[0]):
        idx = ((lambert > 0) & ~is_sky).nonzero()[:, 0]                  # lit surfaces: is the sun blocked?
        start = points[idx] + normal[idx] * SHADOW_OFFSET
        t_block, _, _ = intersect_boxes(start, scene.sun_dir[None], *casters)
        lambert = lambert.index_put((idx,), torch.where(torch.isinf(t_block), lambert[idx], 0.0))
    facing_up = -normal[:, 1:2]                                          # 1 for tops and ground, 0 for sides
    ambient = scene.ambient * (AMBIENT_SIDE + (1 - AMBIENT_SIDE) * facing_up)
    surface = albedo * (ambient + scene.sun_color * lambert[:, None])

    horizon_dirs = dirs * torch.tensor([1.0, 0.0, 1.0], device=dirs.device)  # fog: the sky at the horizon
    horizon_dirs = horizon_dirs / horizon_dirs.norm(dim=-1, keepdim=True).clamp(min=RAY_EPS)
    fog = 1 - torch.exp(-scene.fog_density * torch.where(is_sky, 0.0, t))[:, None]
    colour = surface + (sky_color(scene, horizon_dirs) - surface) * fog
    colour = torch.where(is_sky[:, None], sky_color(scene, dirs), colour)
    return colour.clamp(0, 1), t


def _camera_rays(k: torch.Tensor, height: int, width: int, device) -> torch.Tensor:
    """Unit camera-space directions [height·width, 3] through pixel centres (col + 0.5, row + 0.5)."""
    fx, fy, cx, cy = k.tolist()
    x = (torch.arange(width, dtype=torch.float32, device=device) + 0.5 - cx) / fx
    y = (torch.arange(height, dtype=torch.float32, device=device) + 0.5 - cy) / fy
    gy, gx = torch.meshgrid(y, x, indexing="ij")
    d = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).reshape(-1, 3)
    return d / d.norm(dim=-1, keepdim=True)


def render(scene: Scene, c2w, intrinsics=DEFAULT_INTRINSICS, height: int = 96, width: int = 160, device=None,
           *, supersample: int | None = None, shadows: bool = True, return_depth: bool = False,
           frame_batch: int = 1, ray_box_elements: int = MAX_RAY_BOX_ELEMENTS):
    """Render the scene from camera-to-world poses c2w [N, 4, 4] (or [4, 4]; numpy or torch, any float).

    `intrinsics` (fx, fy, cx, cy) describe a 480×832 image and are rescaled to height×width like
    `camera.scale_intrinsics`. Returns float32 frames [N, 3, H, W] in [-1, 1] on `device` (default: the
    scene's). `supersample` s casts s×s rays per pixel and averages them (default: 2 for images up to
    SMALL_IMAGE_PIXELS, else 1). With `return_depth`, returns (frames, depth [N, H, W]): distance along
    the ray to the nearest surface in the pixel (min over sub-pixel rays), inf where only sky is seen.

    `frame_batch` > 1 shades that many frames' rays together against every box (no per-frame culling):
    fewer, larger kernels, the fast path on a GPU (a 33-frame 96×160 clip in one batch). Culling only
    skips boxes a frame cannot see, so the image is the same up to float rounding. `ray_box_elements`
    bounds rays × boxes per chunk (memory: ~120 bytes each).
    """
    device = torch.device(device) if device is not None else scene.box_min.device
    scene = scene.to(device)
    c2w = c2w if torch.is_tensor(c2w) else torch.from_numpy(np.asarray(c2w))
    c2w = c2w.to(device=device, dtype=torch.float32).reshape(-1, 4, 4)
    s = supersample or (DEFAULT_SUPERSAMPLE if height * width <= SMALL_IMAGE_PIXELS else 1)
    # s×s sub-pixel rays at offsets (a + 0.5)/s are exactly the pixel centres of an s-times larger image.
    k = scale_intrinsics(intrinsics, height * s, width * s)
    cam_dirs = _camera_rays(k, height * s, width * s, device)            # [P, 3]

    corners, volumes = box_corners(scene.box_min, scene.box_max), shadow_volume_points(scene)
    n, p = len(c2w), len(cam_dirs)
    colour = torch.empty(n, p, 3, device=device)
    depth = torch.empty(n, p, device=device)
    if frame_batch > 1:
        casters = (scene.box_min, scene.box_max) if shadows else None
        chunk = max(1, ray_box_elements // max(1, len(scene.box_min)))
        for i in range(0, n, frame_batch):
            poses = c2w[i:i + frame_batch]
            dirs = (cam_dirs[None] @ poses[:, :3, :3].transpose(1, 2)).reshape(-1, 3)
            origins = poses[:, None, :3, 3].expand(-1, p, 3).reshape(-1, 3)
            out_c = colour[i:i + frame_batch].view(-1, 3)
            out_d = depth[i:i + frame_batch].view(-1)
            for j in range(0, len(dirs), chunk):
                out_c[j:j + chunk], out_d[j:j + chunk] = shade(scene, origins[j:j + chunk], dirs[j:j + chunk],
                                                               casters)
    for i in range(n if frame_batch <= 1 else 0):                        # one frame at a time, rays in chunks
        # Only boxes that can appear in this frame, and those whose shadows can, are intersected.
        seen = boxes_in_view(corners, c2w[i], k, height * s, width * s)
        view = replace(scene, box_min=scene.box_min[seen], box_max=scene.box_max[seen], box_color=scene.box_color[seen])
        casters = None
        if shadows:
            shading = boxes_in_view(volumes, c2w[i], k, height * s, width * s)
            casters = (scene.box_min[shading], scene.box_max[shading])
        dirs = cam_dirs @ c2w[i, :3, :3].T
        origin = c2w[i, None, :3, 3]
        chunk = max(1, MAX_RAY_BOX_ELEMENTS // max(1, len(view.box_min), 0 if casters is None else len(casters[0])))
        for j in range(0, p, chunk):
            colour[i, j:j + chunk], depth[i, j:j + chunk] = shade(view, origin, dirs[j:j + chunk], casters)
    frames = colour.reshape(n, height * s, width * s, 3).permute(0, 3, 1, 2)
    depth = depth.reshape(n, 1, height * s, width * s)
    if s > 1:
        frames = F.avg_pool2d(frames, s)
        depth = -F.max_pool2d(-depth, s)
    frames = (frames * 2 - 1).clamp(-1, 1).contiguous()
    return (frames, depth[:, 0]) if return_depth else frames


# ----------------------------------------------------------------------------------------------------
# Keyboard schedules and clips

# Key combinations a random schedule is made of, with weights: mostly walking forward and turning.
ACTION_CHOICES = {
    "w": 6.0, "wj": 2.5, "wl": 2.5, "j": 1.5, "l": 1.5, "none": 1.0, "s": 0.5, "a": 0.6, "d": 0.6,
    "wa": 0.6, "wd": 0.6, "i": 0.5, "k": 0.5, "wi": 0.3, "wk": 0.3,
}
SEGMENT_FRAMES = (4, 16)          # a schedule's segments last this many frames (inclusive)
MAX_PITCH_FRAMES = 10             # random schedules keep |pitch| within this many 2° steps
ACTIONS_STREAM = 1                # render_clip's random schedule draws from the seed sequence (seed, this)


def random_actions(rng, num_frames: int) -> list[frozenset[str]]:
    """Random keyboard schedule: one frozenset of pressed keys per frame (empty = no key), `num_frames` long.

    Segments of SEGMENT_FRAMES frames, each one key combination from ACTION_CHOICES; a segment's I/K key
    is dropped where it would tilt the camera more than MAX_PITCH_FRAMES steps up or down. `rng` is a
    seed or a numpy Generator.
    """
    rng = np.random.default_rng(rng)
    names = list(ACTION_CHOICES)
    weights = np.array(list(ACTION_CHOICES.values()))
    frames: list[frozenset[str]] = []
    pitch = 0
    while len(frames) < num_frames:
        keys = set() if (name := names[rng.choice(len(names), p=weights / weights.sum())]) == "none" else set(name)
        length = min(int(rng.integers(SEGMENT_FRAMES[0], SEGMENT_FRAMES[1] + 1)), num_frames - len(frames))
        step = ("i" in keys) - ("k" in keys)
        if abs(pitch + step * length) > MAX_PITCH_FRAMES:
            keys -= {"i", "k"}
            step = 0
        pitch += step * length
        frames.extend([frozenset(keys)] * length)
    return frames


def render_clip(seed: int, num_frames: int = 33, height: int = 96, width: int = 160, prompt: str | None = None,
                actions=None, device=None, **render_kwargs) -> dict:
    """One training clip of a random world walked through by a keyboard schedule.

    `actions`: None (random, from the seed), a string like "w-16,jw-16", or per-frame key sets; shorter
    schedules are padded with no-key frames. `num_frames` must be 4n+1. Returns a dict:
    - frames [F, 3, H, W] float32 in [-1, 1]; frame i is rendered from poses[i];
    - poses [F + 1, 4, 4] float64 camera-to-world, the whole `trajectory_from_actions` output (pose 0 is the
      identity; the last pose, after the last key frame, is not rendered). Pass all F + 1 to
      `camera_condition(..., truncate=False)`, as keyboard-string generation does;
    - intrinsics [4] float32 (fx, fy, cx, cy) of a 480×832 image (camera.DEFAULT_INTRINSICS);
    - actions: list of F frozensets of keys; wasd [F, 4] float32 W/A/S/D key states (for Act models);
    - prompt: a short description built from the scene parameters.
    Extra keyword arguments go to `render` (supersample, shadows).
    """
    scene = make_scene(seed, prompt)
    if actions is None:
        actions = random_actions([int(seed), ACTIONS_STREAM], num_frames)
    elif isinstance(actions, str):
        actions = parse_action_string(actions)
    actions = [frozenset(keys) for keys in actions]
    poses = trajectory_from_actions(actions, num_frames)
    actions = actions + [frozenset()] * (num_frames - len(actions))
    frames = render(scene, poses[:num_frames], DEFAULT_INTRINSICS, height, width,
                    device=device or "cpu", **render_kwargs)
    wasd = np.array([[float(k in keys) for k in WASD] for keys in actions], dtype=np.float32)
    return dict(frames=frames, poses=poses, intrinsics=torch.from_numpy(DEFAULT_INTRINSICS.copy()),
                actions=actions, wasd=torch.from_numpy(wasd), prompt=scene.describe())


def action_keys(actions: Iterable[Iterable[str]]) -> str:
    """Compact string of a schedule, e.g. 'w-8,jw-4' (the inverse of parse_action_string)."""
    out: list[str] = []
    prev, count = None, 0
    for keys in list(actions) + [None]:
        name = None if keys is None else ("".join(sorted(keys)) or "none")
        if name == prev:
            count += 1
            continue
        if prev is not None:
            out.append(f"{prev}-{count}")
        prev, count = name, 1
    return ",".join(out)
