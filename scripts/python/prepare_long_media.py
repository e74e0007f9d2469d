#!/usr/bin/env python3
"""Long-media evaluation set: BBC articles inside neutral spoken chatter.

Each item imitates an hour-long recording whose subject takes only part of it: a generic title
("Episode 12"), no description, and a transcript made of neutral studio chatter (greetings,
sound checks, housekeeping, small talk; written for this benchmark, no topic words) with the
article's title, description and text placed at a chosen position. Lengths are in model tokens
(the tokenizer of --model), positions are the article's start as a fraction of the chatter.

Writes JSONL rows {id, label, title, transcript, tokens, position, article_tokens, article_id};
rows with position "alone" carry the article alone (same generic title), the reference the
goal is measured against. Deterministic (seeded). Reads the BBC file prepare_bbc.py writes;
nothing third-party is stored in the repository.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# Neutral chatter: no subject words of any news section, film genre or product.
CHATTER = [
    "Hello and welcome back, everyone.", "It's good to be here again.", "Thanks for having me.",
    "Let me just check that the microphone is working.", "Can you hear me all right?",
    "We had a bit of a delay getting started today, so thanks for your patience.",
    "Before we begin, a few housekeeping notes.", "If you're just joining us, make yourself comfortable.",
    "I've got my coffee, so I think we're ready.", "The weather outside is pretty grey this morning.",
    "Right, where were we?", "I was saying earlier that the traffic was terrible on the way in.",
    "My dog kept me up half the night, so bear with me.", "Let's see how long this takes.",
    "Okay, okay.", "Yeah, absolutely.", "Mm-hmm, I agree with that.", "That's a fair point, I suppose.",
    "Anyway, moving on.", "Sorry, go ahead.", "No, no, you first.", "I lost my train of thought there.",
    "Give me one second, I need to find my notes.", "Where did I put that piece of paper?",
    "Is that light supposed to be blinking?", "I think the recording has started now.",
    "We'll probably tidy this bit up later.", "Let's take a quick breath and carry on.",
    "I had a really odd dream last night, but that's a story for another time.",
    "My neighbour has been painting his fence all week.", "Somebody left the window open again.",
    "It's a bit chilly in here, isn't it?", "I always forget which button does what.",
    "We should really get a new chair for this room.", "Did you have lunch yet?",
    "I had a sandwich on the way, nothing special.", "The kettle is finally fixed, by the way.",
    "Let me mute my phone so it doesn't buzz.", "Okay, that's better.", "Right then.",
    "So, yes, as I was saying.", "Honestly, I don't remember who suggested that.",
    "We can come back to that in a minute.", "Remind me to send you that link afterwards.",
    "I'll put a note in the calendar.", "Thanks again for making the time.",
    "It's been a long week for everybody.", "The building's lift was out of order this morning.",
    "I walked up six flights of stairs, so I'm a little out of breath.",
    "There's a strange echo in here today.", "Let's move the table a bit closer.",
    "Can everybody see the clock from there?", "We've got plenty of time, no rush at all.",
    "That reminds me, I need to water my plants.", "Sorry about the noise outside.",
    "They're doing some work on the road again.", "Anyway, where was I?", "Yes, exactly.",
    "I wouldn't go that far, but sure.", "Let's keep going.", "Okay, good, good.",
    "I'm told we're running a few minutes late.", "Let me read the next note.",
    "I can't read my own handwriting here.", "It says something about the schedule, I think.",
    "We'll sort that out after the break.", "And we're back.", "Welcome back, everyone.",
    "Did I miss anything while I was away?", "Not much, we were just chatting.",
    "I think my cousin would find this very funny.", "The cafe downstairs had run out of milk.",
    "I ended up with a very strange tea instead.", "Let me check the time.", "Right, lovely.",
]

SEP = " "


def chatter(rng: random.Random, tok, n_tokens: int) -> str:
    """Sentences of CHATTER (varied order, a speaker label now and then) up to ~n_tokens."""
    out, count = [], 0
    while count < n_tokens:
        s = rng.choice(CHATTER)
        if rng.random() < 0.15:
            s = rng.choice(["A:", "B:", "Host:", "Guest:"]) + " " + s
        out.append(s)
        count += len(tok.encode(s, add_special_tokens=False).ids) + 1
    return SEP.join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bbc", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[2] / "models" / "all-MiniLM-L6-v2")
    ap.add_argument("--articles", type=int, default=60, help="articles (every k-th, all sections)")
    ap.add_argument("--lengths", default="2500,10000", help="total transcript tokens (10000 ~ an hour of speech)")
    ap.add_argument("--positions", default="0,0.5,0.95", help="article start as a fraction of the chatter")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    from tokenizers import Tokenizer  # noqa: PLC0415

    tok = Tokenizer.from_file(str(a.model / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    rows = [json.loads(l) for l in a.bbc.read_text(encoding="utf-8").splitlines() if l.strip()]
    step = max(1, len(rows) // a.articles)
    rows = rows[::step][: a.articles]
    rng = random.Random(a.seed)
    out = []
    for i, r in enumerate(rows):
        article = "\n".join(p for p in [r["title"], r.get("description") or "", r.get("text") or ""] if p.strip())
        at = len(tok.encode(article, add_special_tokens=False).ids)
        title = f"Episode {rng.randint(2, 240)}"
        base = {"label": r["label"], "title": title, "article_id": r["id"], "article_tokens": at}
        out.append({**base, "id": f"{r['id']}/alone", "transcript": article, "tokens": at, "position": "alone"})
        for length in [int(x) for x in a.lengths.split(",")]:
            pad = max(0, length - at)
            for pos in [float(x) for x in a.positions.split(",")]:
                before = chatter(rng, tok, int(pad * pos)) if pos > 0 else ""
                after = chatter(rng, tok, pad - int(pad * pos))
                text = "\n".join(p for p in [before, article, after] if p)
                n = len(tok.encode(text, add_special_tokens=False).ids)
                out.append({**base, "id": f"{r['id']}/{length}/{pos}", "transcript": text, "tokens": n, "position": pos, "length": length})
        if i % 20 == 0:
            print(f"{i}/{len(rows)}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("".join(json.dumps(o) + "\n" for o in out), encoding="utf-8")
    print(f"{len(out)} items -> {a.out}")


if __name__ == "__main__":
    main()
