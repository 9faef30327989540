"""Procedural 3D worlds rendered in torch: video clips with exact camera poses, for training small
camera-controlled video models (see `scene` for what a world is made of and how it is drawn)."""
from worldstream.world.scene import (Scene, action_keys, intersect_boxes, make_scene, random_actions, render,
                                     render_clip)

__all__ = ["Scene", "action_keys", "intersect_boxes", "make_scene", "random_actions", "render", "render_clip"]
