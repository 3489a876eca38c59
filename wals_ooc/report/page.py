"""The report as one self-contained HTML page: inline CSS, plots as inline PNG (data: URIs).

Each part is a ``<section class="panel" id="...">`` (training, metrics, popularity, users), so
a reader (or a test) finds every panel and its image by id.
"""

from __future__ import annotations

import base64
import html
from typing import Any

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 0; background: #f4f5f7;
       color: #222; }
header { background: #23395d; color: white; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header p { margin: 2px 0; font-size: 13px; opacity: 0.9; }
main { padding: 16px 32px 32px 32px; max-width: 1200px; }
.panel { background: white; border-radius: 6px; box-shadow: 0 1px 3px rgba(0,0,0,0.12); padding: 14px 20px;
         margin: 16px 0; }
.panel h2 { margin: 0 0 8px 0; font-size: 17px; color: #23395d; }
.panel img { max-width: 100%; display: block; margin: 6px 0; }
.note { color: #555; font-size: 13px; }
.facts { display: flex; flex-wrap: wrap; gap: 8px 28px; margin: 6px 0 4px 0; font-size: 13px; }
.facts div b { display: block; font-size: 18px; color: #23395d; }
table { border-collapse: collapse; font-size: 12px; }
td, th { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
th { color: #555; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.users { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 14px; }
.user { border: 1px solid #e3e6ea; border-radius: 5px; padding: 8px 10px; }
.user h3 { margin: 0 0 6px 0; font-size: 14px; }
.pair { display: flex; gap: 14px; }
.pair > div { flex: 1; }
tr.hit td { background: #e4f4e4; font-weight: 600; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _facts(pairs: list[tuple[str, str]]) -> str:
    return '<div class="facts">' + "".join(f"<div><b>{_e(v)}</b>{_e(k)}</div>" for k, v in pairs) + "</div>"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def training_section(training: dict, png: bytes) -> str:
    its = len(training["iteration"])
    losses = [v for v in training["loss"] if v is not None]
    total = sum(training["seconds"])
    facts = [("iterations", str(its)), ("final loss", _fmt(losses[-1] if losses else None, 6)),
             ("seconds in all", f"{total:.2f}"), ("seconds per iteration (median)",
                                                  f"{sorted(training['seconds'])[its // 2]:.3f}" if its else "n/a")]
    return (f'<section class="panel" id="training"><h2>Training: loss and time per iteration</h2>{_facts(facts)}'
            f'{_img(png, "loss and seconds per iteration")}</section>')


def metrics_section(metrics: dict | None, png: bytes | None, k_max: int) -> str:
    if metrics is None:
        return ('<section class="panel" id="metrics"><h2>Ranking metrics at k</h2><p class="note">No test store '
                "given: make one with <code>wals-ooc split</code>, train on its train side, and pass "
                "<code>--test TEST</code> to see precision, recall, ndcg and map for k = 1.."
                f"{k_max}.</p></section>")
    assert png is not None, "metrics come with their plot"
    at = {k: i for i, k in enumerate(metrics["k"])}
    rows = "".join(
        f"<tr><td class='num'>{k}</td>" + "".join(f"<td class='num'>{metrics[m][at[k]]:.4f}</td>"
                                               for m in ("precision", "recall", "ndcg", "map")) + "</tr>"
        for k in (1, 5, 10, 20, 50) if k in at
    )
    skipped = metrics.get("skipped_users", 0), metrics.get("skipped_test_items", 0)
    note = (f"<p class='note'>{metrics['users']:,} test users; {skipped[0]:,} test users and {skipped[1]:,} held-out "
            "items unknown to the model were left out.</p>")
    return (f'<section class="panel" id="metrics"><h2>Ranking metrics at k = 1..{max(metrics["k"])}</h2>'
            f"{_facts([('AUC', format(metrics['auc'], '.4f')), ('users', format(metrics['users'], ','))])}"
            f'{_img(png, "precision, recall, ndcg and map at k")}'
            f"<table><tr><th>k</th><th>precision</th><th>recall</th><th>ndcg</th><th>map</th></tr>{rows}</table>"
            f"{note}</section>")


def popularity_section(popularity: dict, png: bytes) -> str:
    p = popularity
    facts = [
        ("catalogue coverage", f"{p['coverage']:.1%} ({p['items_recommended']:,} of {p['n_items']:,} items)"),
        ("recommendations to the head", f"{p['head_recommendation_share']:.1%}"),
        ("to the long tail", f"{p['tail_recommendation_share']:.1%}"),
        ("mean popularity: recommended / interacted", f"{p['mean_popularity_recommended']:.0f} / "
                                                       f"{p['mean_popularity_interactions']:.0f}"),
    ]
    note = (f"<p class='note'>Top-N lists of {p['users_sampled']:,} sampled users ({p['recommendations']:,} "
            f"recommendations). The head is the {p['head_items']:,} most popular items "
            f"({p['head_item_share']:.1%} of the catalogue, at least {p['head_min_popularity']:,} users each), which "
            f"hold {p['head_interaction_share']:.1%} of the interactions; the long tail is the rest.</p>")
    return (f'<section class="panel" id="popularity"><h2>Popularity of recommended items against the catalogue</h2>'
            f"{_facts(facts)}{_img(png, 'popularity of recommended items')}{note}</section>")


def _label(row: dict, key: str = "item") -> str:
    """An item's (or user's) display name with its id beside it, or the id alone when it has none."""
    name = row.get("name")
    return f"{_e(name)} <span class='note'>({_e(row[key])})</span>" if name else _e(row[key])


def _item_table(title: str, rows: list[dict], kind: str) -> str:
    if kind == "history":
        head = "<tr><th>item</th><th>value</th><th>popularity</th></tr>"
        body = "".join(f"<tr><td>{_label(r)}</td><td class='num'>{r['value']:g}</td>"
                       f"<td class='num'>{r['popularity']:,}</td></tr>" for r in rows)
    else:
        head = "<tr><th>item</th><th>score</th><th>popularity</th></tr>"
        body = "".join(f"<tr class='{'hit' if r['held_out'] else ''}'><td>{_label(r)}</td>"
                       f"<td class='num'>{r['score']:.3f}</td><td class='num'>"
                       f"{'' if r['popularity'] is None else format(r['popularity'], ',')}</td></tr>" for r in rows)
    return f"<div><b>{_e(title)}</b><table>{head}{body}</table></div>"


def users_section(users: list[dict], has_test: bool) -> str:
    cards = []
    for u in users:
        hits = sum(r["held_out"] for r in u["recommendations"])
        test_note = f", {u['held_out']} held out, {hits} of them recommended" if has_test else ""
        cards.append(
            f'<div class="user"><h3>user {_label(u, "user")} <span class="note">({u["entries"]} items in training'
            f"{test_note})</span></h3><div class='pair'>"
            f"{_item_table('strongest interactions', u['history'], 'history')}"
            f"{_item_table('recommended', u['recommendations'], 'recommendations')}</div></div>"
        )
    legend = ("<p class='note'>Popularity: users who interacted with the item. "
              + ("Highlighted: recommended items the user interacted with in the test store.</p>" if has_test else "</p>"))
    body = "".join(cards) if cards else "<p class='note'>No users to show.</p>"
    return (f'<section class="panel" id="users"><h2>A few users: history beside recommendations</h2>{legend}'
            f'<div class="users">{body}</div></section>')


def page(title: str, subtitle: list[str], sections: list[str]) -> str:
    lines = "".join(f"<p>{_e(s)}</p>" for s in subtitle)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body><header><h1>{_e(title)}</h1>{lines}</header>"
            f"<main>{''.join(sections)}</main></body></html>\n")
