"""Write the draft head's training prompts (src/lambdasplit/device/draft_data/train_prompts.json):
chat-style requests from templates x topics, shuffled with a fixed seed. The held-out chat set
(heldout_chat.json, written by hand) shares none of these topics and is never trained on.

    python3 scripts/draft_prompts.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "volcanoes", "the immune system", "vaccines", "gravity",
    "electricity", "magnets", "climate change", "recycling", "the moon", "rainbows", "earthquakes", "DNA",
    "the internet", "email", "passwords", "cloud computing", "machine learning", "a database", "a web browser",
    "a compiler", "version control with git", "spreadsheets", "budgeting", "saving for retirement", "credit cards",
    "interest rates", "inflation", "taxes", "renting an apartment", "buying a used car", "job interviews",
    "writing a resume", "public speaking", "time management", "procrastination", "meditation", "running",
    "yoga", "healthy breakfasts", "drinking enough water", "vegetarian cooking", "baking bread", "making pasta",
    "brewing coffee", "growing tomatoes", "houseplants", "composting", "dogs", "cats", "birds", "bees",
    "dinosaurs", "the ocean", "deserts", "rainforests", "mountains", "the Roman Empire", "ancient Egypt",
    "the printing press", "the steam engine", "airplanes", "trains", "bicycles", "electric cars", "solar panels",
    "wind power", "chess", "soccer", "basketball", "learning a language", "learning to play guitar", "painting",
    "photography", "writing poetry", "reading more books", "studying for exams", "teamwork", "friendship",
    "moving to a new city", "travelling on a budget", "packing for a trip", "camping", "hiking safety",
    "first aid", "sleep", "stress", "kindness", "museums", "libraries", "music", "jazz", "movies", "board games",
]
TEMPLATES = [
    "Explain {t} in simple terms.", "What is {t}?", "Give me three tips about {t}.", "Write a short poem about {t}.",
    "Tell me an interesting fact about {t}.", "Why does {t} matter?", "How would you explain {t} to a child?",
    "Summarize the main ideas of {t} in a few sentences.", "What are common mistakes people make with {t}?",
    "Write a short story that involves {t}.", "What are the pros and cons of {t}?", "Give me a quick overview of {t}.",
    "I want to learn about {t}. Where should I start?", "Can you describe {t} in one paragraph?",
    "List five questions a beginner might ask about {t}.", "Write a friendly tweet about {t}.",
]
EXTRA = [
    "Write a haiku about autumn.", "Say hello and introduce yourself.", "What can you help me with?",
    "Translate 'good morning' into French, Spanish and German.", "Write a thank-you note to a teacher.",
    "Give me a recipe for pancakes.", "Write a Python function that reverses a string.",
    "Write a Python function that checks whether a number is prime.", "What is 15 times 12?",
    "Write a short email asking a colleague for a meeting.", "Tell me a joke.", "What day comes after Tuesday?",
    "Write a limerick about a cat.", "Give me a motivational quote and explain it.", "How do I boil an egg?",
    "What is the capital of Japan?", "Write a SQL query that counts the rows of a table named users.",
    "Write a JavaScript function that adds two numbers.", "Explain what a for loop is.", "How many days are in a leap year?",
]


def prompts(count: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pool = [template.format(t=topic) for topic in TOPICS for template in TEMPLATES]
    rng.shuffle(pool)
    return EXTRA + pool[: count - len(EXTRA)]


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "src" / "lambdasplit" / "device" / "draft_data" / "train_prompts.json"
    out.write_text(json.dumps(prompts(), indent=1) + "\n")
    print(f"wrote {out}")
