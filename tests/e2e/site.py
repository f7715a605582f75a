"""A small generated website in English and French, served over HTTP on 127.0.0.1.

Pages are paragraphs of grammatical sentences built from word lists, so fastText sees
real English and French, the quality rules see prose, and no two pages share enough
5-grams to be near-duplicates, except the copies the site plants on purpose.
"""

from __future__ import annotations

import random
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

EN = {
    "adj": [
        "new",
        "old",
        "small",
        "busy",
        "remote",
        "local",
        "secure",
        "broken",
        "shared",
        "quiet",
        "fast",
        "careful",
        "main",
        "spare",
        "public",
        "private",
        "default",
        "stable",
        "recent",
        "large",
    ],
    "noun": [
        "server",
        "kernel",
        "package",
        "mirror",
        "printer",
        "laptop",
        "firewall",
        "account",
        "archive",
        "router",
        "database",
        "certificate",
        "daemon",
        "script",
        "disk",
        "network",
        "cluster",
        "terminal",
        "library",
        "service",
    ],
    "verb": [
        "installs",
        "updates",
        "checks",
        "configures",
        "removes",
        "downloads",
        "verifies",
        "restarts",
        "monitors",
        "documents",
        "backs up",
        "replaces",
        "tests",
        "patches",
        "moves",
    ],
    "adv": [
        "quickly",
        "every night",
        "with care",
        "again",
        "before noon",
        "twice",
        "at once",
        "on Monday",
        "each week",
        "slowly",
    ],
    "templates": [
        "The {adj} {noun} {verb} the {adj} {noun} of the {noun} {adv}.",
        "A {adj} {noun} and the {noun} {verb} the {noun} to the {adj} {noun}.",
        "With the {adj} {noun}, the {noun} {verb} every {noun} {adv}.",
    ],
}
FR = {
    "adj": [
        "nouveau",
        "vieux",
        "petit",
        "grand",
        "distant",
        "local",
        "sûr",
        "cassé",
        "partagé",
        "calme",
        "rapide",
        "principal",
        "public",
        "privé",
        "stable",
        "récent",
        "lent",
        "simple",
        "propre",
        "libre",
    ],
    "noun": [
        "serveur",
        "noyau",
        "paquet",
        "miroir",
        "pilote",
        "portable",
        "pare-feu",
        "compte",
        "routeur",
        "démon",
        "script",
        "disque",
        "réseau",
        "terminal",
        "service",
        "fichier",
        "système",
        "certificat",
        "navigateur",
        "journal",
    ],
    "verb": [
        "installe",
        "met à jour",
        "vérifie",
        "configure",
        "supprime",
        "télécharge",
        "contrôle",
        "redémarre",
        "surveille",
        "remplace",
        "teste",
        "déplace",
        "sauvegarde",
        "corrige",
        "documente",
    ],
    "adv": [
        "rapidement",
        "chaque nuit",
        "avec soin",
        "encore",
        "avant midi",
        "deux fois",
        "tout de suite",
        "le lundi",
        "chaque semaine",
        "lentement",
    ],
    "templates": [
        "Le {noun} {adj} {verb} le {noun} {adj} du {noun} {adv}.",
        "Un {noun} {adj} et le {noun} {verb} le {noun} pour le {noun} {adj}.",
        "Avec le {noun} {adj}, le {noun} {verb} chaque {noun} {adv}.",
    ],
}


def sentence(rng: random.Random, words: dict) -> str:
    """One grammatical sentence: slots drawn independently, so word 5-grams rarely repeat."""
    out = rng.choice(words["templates"])
    while "{" in out:
        slot = out[out.index("{") + 1 : out.index("}")]
        out = out.replace("{" + slot + "}", rng.choice(words[slot]), 1)
    return out


def page_text(rng: random.Random, words: dict, paragraphs: int = 4, sentences: int = 5) -> str:
    return "\n\n".join(" ".join(sentence(rng, words) for _ in range(sentences)) for _ in range(paragraphs))


def html(title: str, body: str, links: list[str], lang: str) -> str:
    paras = "".join(f"<p>{p}</p>" for p in body.split("\n\n"))
    nav = "".join(f'<li><a href="{href}">{href}</a></li>' for href in links)
    return (
        f'<!DOCTYPE html><html lang="{lang}"><head><meta charset="utf-8"><title>{title}</title></head>'
        f"<body><nav><ul>{nav}</ul></nav><main><h1>{title}</h1>{paras}</main><footer>Generated site</footer></body></html>"
    )


def build_site(root: Path, pages_per_lang: int = 24, near_copies: int = 3, seed: int = 0) -> dict:
    """Write the site; returns what was planted (page counts, near-duplicate copies)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    index_links = []
    texts = {}
    for lang, words in (("en", EN), ("fr", FR)):
        names = [f"{lang}/page-{i:03d}.html" for i in range(pages_per_lang)]
        index_links += names
        for i, name in enumerate(names):
            text = page_text(rng, words)
            texts[name] = text
            siblings = [Path(n).name for n in names[max(0, i - 2) : i + 3] if n != name]
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(html(f"{lang} page {i}", text, siblings, lang), encoding="utf-8")
    # Near-duplicates: an English page republished with one sentence changed (Jaccard > 0.8).
    for k in range(near_copies):
        src = f"en/page-{k:03d}.html"
        sentences = texts[src].split(". ")
        sentences[0] = "The release manager signs the final images on Friday"  # one sentence of twenty changed
        name = f"en/copy-{k:03d}.html"
        (root / name).write_text(html(f"copy {k}", ". ".join(sentences), [], "en"), encoding="utf-8")
        index_links.append(name)
    (root / "index.html").write_text(
        html("index", "Welcome to the generated site.", index_links, "en"), encoding="utf-8"
    )
    (root / "robots.txt").write_text("User-agent: *\nDisallow: /private/\n")
    (root / "private").mkdir(exist_ok=True)
    (root / "private" / "secret.html").write_text(html("secret", "nothing to see", [], "en"))
    return {"pages": 2 * pages_per_lang, "near_copies": near_copies}


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(root: Path) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"
