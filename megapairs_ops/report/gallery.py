"""The seeded gallery: triplets sampled per encoder (sql/report_gallery.sql), their thumbnails in
reports/thumbs/, and the gallery section showing query, target and hard negatives."""

from __future__ import annotations

import logging
from html import escape
from pathlib import Path
from typing import Any

from megapairs_ops.config import PipelineConfig
from megapairs_ops.layout import RunLayout
from megapairs_ops.storage import atomic_dir

from .figures import ReportDb
from .html import encoder_colour, fmt_int, missing_note, section_frame

log = logging.getLogger(__name__)


THUMB_SIDE = 224


def pick_gallery(db: ReportDb, cfg: PipelineConfig, layout: RunLayout, parts: list[Path]) -> list[dict[str, Any]]:
    """A seeded sample of triplets, `curation.gallery_per_encoder` per encoder that found them
    (a pair found by several encoders appears once, under the first)."""
    k = cfg.curation.gallery_per_encoder
    if not parts or not k:
        return []
    picked: list[dict[str, Any]] = []
    for enc in (e.name for e in cfg.encoders):
        rows = db.rows("report_gallery_sample", {
            "paths": [str(p) for p in parts], "encoder": enc, "seed": str(cfg.seed), "k": k,
            "taken": [r["pair_id"] for r in picked]})
        picked += [dict(r, stratum=enc) for r in rows]
    if not picked or not layout.images.is_file():
        return picked
    paths = sorted({p for r in picked for p in [r["q_img"], r["t_img"], *r["hns"]]})
    images = {r["path"]: r for r in db.rows("report_gallery_images", {"images": str(layout.images), "paths": paths})}
    for r in picked:
        r["images"] = images
    return picked


def make_thumbs(picked: list[dict[str, Any]], layout: RunLayout, max_pixels: int) -> dict[str, tuple[int, int]]:
    """JPEG thumbnails named by image id; returns id -> (width, height) for those that could be
    made (an image that moved or broke since ingest gets a placeholder in the page)."""
    from megapairs_ops.media import load_rgb, read_image_bytes

    wanted: dict[str, str] = {}
    for r in picked:
        for path in [r["q_img"], r["t_img"], *r["hns"][1:]]:
            info = r.get("images", {}).get(path)
            if info:
                wanted[info["image_id"]] = path
    sizes: dict[str, tuple[int, int]] = {}
    with atomic_dir(layout.thumbs_dir) as tmp:
        for image_id, path in sorted(wanted.items()):
            try:
                img = load_rgb(read_image_bytes(path), max_pixels)
                img.thumbnail((THUMB_SIDE, THUMB_SIDE))
                img.save(tmp / f"{image_id}.jpg", "JPEG", quality=85)
                sizes[image_id] = img.size
            except Exception as exc:  # noqa: BLE001 - any unreadable image becomes a placeholder
                log.warning("no thumbnail for %s: %s", path, exc)
    return sizes


def _img(image: dict[str, Any] | None, sizes: dict[str, tuple[int, int]], cls: str, alt: str) -> str:
    image_id = image["image_id"] if image else None
    if image_id and image_id in sizes:
        w, h = sizes[image_id]
        return (f'<img class="{cls}" src="thumbs/{escape(image_id)}.jpg" width="{w}" height="{h}" '
                f'alt="{escape(alt)}" title="{escape((image or {}).get("caption") or "")}">')
    return (f'<svg class="{cls} placeholder" viewBox="0 0 100 100" role="img" aria-label="image unavailable" '
            'xmlns="http://www.w3.org/2000/svg"><rect width="100" height="100" fill="#eef1f5"/>'
            '<text x="50" y="54" text-anchor="middle" font-size="10" fill="#8a94a3">unavailable</text></svg>')


def gallery_section(cfg: PipelineConfig, picked: list[dict[str, Any]], sizes: dict[str, tuple[int, int]],
                     source: str) -> str:
    if not picked:
        return section_frame("gallery", "Gallery", missing_note("triplets to sample"))
    names = [e.name for e in cfg.encoders]
    cards = []
    stratum = None
    for r in picked:
        if r["stratum"] != stratum:
            stratum = r["stratum"]
            cards.append(f'<h3 class="stratum"><span class="enc" style="--c:{encoder_colour(names, stratum)}">'
                         f"{escape(stratum)}</span> found these</h3>")
        images = r.get("images", {})
        q, t = images.get(r["q_img"]), images.get(r["t_img"])
        views = " ".join(f'<span class="enc" style="--c:{encoder_colour(names, e)}">{escape(e)} {s:.3f}</span>'
                         for e, s in zip(r["encoders"], r["sims"]))
        instructions = "".join(f"<li>{escape(x)}</li>" for x in r["q_text"])
        hns = "".join(
            f'<figure class="hn">{_img(images.get(p), sizes, "thumb-s", "hard negative")}'
            f"<figcaption><code>{escape((images.get(p) or {}).get('image_id') or '?')}</code></figcaption></figure>"
            for p in r["hns"][1:])

        def side(img: dict[str, Any] | None, role: str) -> str:
            return (f'<figure class="side">{_img(img, sizes, "thumb", role)}<figcaption><b>{role}</b> '
                    f"{escape((img or {}).get('caption') or '')}"
                    f"<br><code>{escape((img or {}).get('image_id') or '?')}</code></figcaption></figure>")
        cards.append(
            f'<article class="triplet"><header>{views}<span class="pid">pair <code>{escape(r["pair_id"])}</code>'
            f"</span></header>"
            f'<div class="qt">{side(q, "query")}<div class="arrow"><ol class="instr">{instructions}</ol></div>'
            f'{side(t, "target")}</div>'
            f'<div class="hns"><span class="dim">hard negatives</span>{hns}</div>'
            f"<details><summary>Description ({fmt_int(r['word_num'])} words requested)</summary>"
            f"<p>{escape(r['description'] or '')}</p></details></article>")
    intro = (f"{len(picked)} triplets of the {source} set, sampled with seed {cfg.seed}: "
             f"{cfg.curation.gallery_per_encoder} per encoder that found them. Ids are what the rejects file "
             "takes (see Curation).")
    return section_frame("gallery", "Gallery", "".join(cards), intro)
