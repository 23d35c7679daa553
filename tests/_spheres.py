"""Tiny SRN-format scenes rendered analytically (two-coloured spheres), fast enough for unit tests.

Each object is a sphere (its own radius, centre and pair of colours, top/bottom hemispheres) seen from cameras
on a circle-ish orbit; rgb/, pose/, depth/ (16-bit, z * 10000, 0 = background) and intrinsics.txt as the
generator writes them.
"""
import os

import imageio.v2 as imageio
import numpy as np

from srn_fast import geometry


def write_sphere_root(root, n_objects=3, n_views=4, size=16, seed=0, radius=2.0, focal=1.4):
    rng = np.random.default_rng(seed)
    f = focal * size
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    pix = np.stack([(cols.ravel() - size / 2) / f, (rows.ravel() - size / 2) / f, np.ones(size * size)], -1)
    for o in range(n_objects):
        folder = os.path.join(root, f"obj_{o:03d}")
        for sub in ("rgb", "pose", "depth"):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
        r = rng.uniform(0.35, 0.6)
        c = rng.uniform(-0.1, 0.1, size=3)
        top, bottom = rng.uniform(0.1, 0.9, size=3), rng.uniform(0.1, 0.9, size=3)
        for v in range(n_views):
            az = 2 * np.pi * (v + rng.uniform(0, 0.5)) / n_views
            el = rng.uniform(-0.2, 0.9)
            eye = radius * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
            c2w = geometry.look_at(eye)
            d = pix @ c2w[:3, :3].T
            d /= np.linalg.norm(d, axis=-1, keepdims=True)
            oc = eye - c
            b = d @ oc
            disc = b * b - (oc @ oc - r * r)
            hit = disc > 0
            t = np.where(hit, -b - np.sqrt(np.clip(disc, 0, None)), 0.0)
            p = eye + t[:, None] * d
            n = (p - c) / r
            shade = 0.45 + 0.55 * np.clip(n @ np.array([0.3, -0.4, 0.87]), 0, None)
            col = np.where((n[:, 2] > 0)[:, None], top, bottom) * shade[:, None]
            rgb = np.where(hit[:, None], col, 1.0).reshape(size, size, 3)
            z = ((p - eye) @ c2w[:3, 2]) * hit
            name = f"{v:06d}"
            imageio.imwrite(os.path.join(folder, "rgb", name + ".png"), (rgb * 255).round().astype(np.uint8))
            imageio.imwrite(os.path.join(folder, "depth", name + ".png"),
                            np.round(z.reshape(size, size) * 10000).astype(np.uint16))
            with open(os.path.join(folder, "pose", name + ".txt"), "w") as fh:
                fh.write(" ".join(f"{x:.10g}" for x in c2w.reshape(-1)) + "\n")
        with open(os.path.join(folder, "intrinsics.txt"), "w") as fh:
            fh.write(f"{f:.10g} {size / 2:.10g} {size / 2:.10g} 0.\n0. 0. 0.\n1.\n{size} {size}\n")
    return root
