"""The draft head's training prompts: several thousand chat-style requests generated from templates x
topics x task kinds (explanations, how-tos, comparisons, writing, code, arithmetic, rewriting a
given text, advice, brainstorming, facts, descriptions, role play), with optional answer-style
constraints, shuffled with a fixed seed.

A head learns what the model's answers look like; the more kinds of request it has seen, the more of
a new conversation it can predict. The held-out chat set (draft_data/heldout_chat.json, written by
hand) is never trained on: any generated prompt that is close to one of it (word-set Jaccard
similarity >= NEAR) is dropped, and tests/test_draft_head.py checks that none is left.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

HELDOUT = Path(__file__).parent / "draft_data" / "heldout_chat.json"
NEAR = 0.5  # word-set Jaccard similarity from which a prompt counts as overlapping a held-out one

TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "volcanoes", "the immune system", "vaccines", "gravity",
    "electricity", "magnets", "climate change", "recycling", "the moon", "rainbows", "earthquakes", "DNA",
    "the internet", "email", "passwords", "cloud computing", "machine learning", "databases", "web browsers",
    "compilers", "version control with git", "spreadsheets", "budgeting", "saving for retirement", "credit cards",
    "interest rates", "inflation", "taxes", "renting an apartment", "buying a used car", "job interviews",
    "writing a resume", "public speaking", "time management", "procrastination", "meditation", "running",
    "yoga", "healthy breakfasts", "drinking enough water", "vegetarian cooking", "baking bread", "making pasta",
    "brewing coffee", "houseplants", "composting", "dogs", "birds", "bees", "dinosaurs", "the ocean",
    "deserts", "rainforests", "mountains", "the Roman Empire", "ancient Egypt", "the printing press",
    "the steam engine", "airplanes", "trains", "electric cars", "solar panels", "wind power", "chess",
    "soccer", "basketball", "learning a language", "learning to play guitar", "painting", "photography",
    "writing poetry", "reading more books", "studying for exams", "teamwork", "friendship",
    "moving to a new city", "travelling on a budget", "camping", "hiking safety", "first aid", "sleep",
    "stress", "kindness", "museums", "libraries", "music", "jazz", "movies", "board games", "the stock market",
    "cryptocurrency", "artificial intelligence", "robots", "smartphones", "social media", "online privacy",
    "electric guitars", "the human heart", "the brain", "bones", "muscles", "nutrition", "vitamins", "allergies",
    "the common cold", "dentists", "hospitals", "nurses", "firefighters", "farmers", "pilots", "architects",
    "bridges", "skyscrapers", "roads", "cities", "villages", "islands", "rivers", "glaciers", "tornadoes",
    "hurricanes", "fog", "snow", "the seasons", "the sun", "stars", "comets", "Mars", "telescopes",
    "microscopes", "bacteria", "viruses", "fungi", "trees", "flowers", "seeds", "insects", "spiders", "sharks",
    "whales", "dolphins", "octopuses", "elephants", "lions", "horses", "owls", "butterflies", "ants",
    "volunteering", "recycling plastic", "saving energy at home", "public transport", "carpooling",
    "online shopping", "small businesses", "marketing", "customer service", "negotiation", "leadership",
    "remote meetings", "note taking", "journaling", "gratitude", "habits", "motivation", "goal setting",
    "parenting", "grandparents", "weddings", "holidays", "birthdays", "gift giving", "cooking rice",
    "knife skills", "spices", "cheese", "chocolate", "ice cream", "pizza", "sushi", "salads", "smoothies",
    "fermentation", "beekeeping", "knitting", "woodworking", "pottery", "origami", "magic tricks",
    "video games", "virtual reality", "podcasts", "radio", "newspapers", "theatre", "opera", "ballet",
    "sculpture", "architecture", "the Renaissance", "the Industrial Revolution", "the Silk Road", "the Vikings",
    "castles", "pyramids", "democracy", "elections", "the United Nations", "human rights", "economics",
    "supply and demand", "banks", "insurance", "mortgages", "freelancing", "starting a business",
]
TOPIC_TEMPLATES = [
    "Explain {t} in simple terms.", "What is {t}?", "Give me three tips about {t}.", "Write a short poem about {t}.",
    "Tell me an interesting fact about {t}.", "Why does {t} matter?", "How would you explain {t} to a child?",
    "Summarize the main ideas of {t} in a few sentences.", "What are common mistakes people make with {t}?",
    "Write a short story that involves {t}.", "What are the pros and cons of {t}?", "Give me a quick overview of {t}.",
    "I want to learn about {t}. Where should I start?", "Can you describe {t} in one paragraph?",
    "List five questions a beginner might ask about {t}.", "Write a friendly tweet about {t}.",
    "Write a haiku about {t}.", "What is the history of {t}?", "Give me an analogy that explains {t}.",
    "Make a short quiz with three questions about {t}.", "What are some myths about {t}?",
    "Write an outline for an essay about {t}.", "Write a short dialogue between two friends about {t}.",
    "What are five words I should know when talking about {t}?", "Write a limerick about {t}.",
    "What would the world be like without {t}?", "Give me a fun activity for kids related to {t}.",
    "What do experts disagree about when it comes to {t}?", "Describe {t} using only simple words.",
    "What are the first steps to get better at {t}?",
]
PAIRS = [
    ("a virus", "a bacterium"), ("weather", "climate"), ("a crocodile", "an alligator"), ("a hurricane", "a tornado"),
    ("a rabbit", "a hare"), ("baking soda", "baking powder"), ("a list", "a tuple in Python"), ("RAM", "storage"),
    ("a star", "a planet"), ("speed", "velocity"), ("a debit card", "a credit card"), ("affect", "effect"),
    ("a simile", "a metaphor"), ("a sea", "an ocean"), ("a monkey", "an ape"), ("a latte", "a cappuccino"),
    ("TCP", "UDP"), ("a loan", "a grant"), ("a museum", "a gallery"), ("a poem", "a song"), ("jam", "jelly"),
    ("a hill", "a mountain"), ("a comet", "an asteroid"), ("a moth", "a butterfly"), ("HTML", "CSS"),
    ("an app", "a website"), ("a lease", "a mortgage"), ("a violin", "a viola"), ("stocks", "bonds"),
    ("a cold", "the flu"), ("a dolphin", "a porpoise"), ("a city", "a town"), ("a bug", "a feature"),
    ("Git", "GitHub"), ("a wolf", "a dog"), ("a novel", "a short story"), ("sugar", "honey"), ("walking", "running"),
]
COMPARE_TEMPLATES = [
    "What is the difference between {a} and {b}?", "Compare {a} and {b} in a short table.",
    "Which is better for a beginner to understand first, {a} or {b}? Explain.", "How are {a} and {b} alike?",
]
TASKS = [
    "change a flat bicycle tyre", "make a budget for the month", "write a thank-you letter", "cook a soft-boiled egg",
    "clean a laptop keyboard", "back up my phone", "learn to juggle", "fall asleep faster", "plan a road trip",
    "make friends in a new city", "prepare for a job interview", "care for a cactus", "make bread without yeast",
    "improve my handwriting", "organize my closet", "stop biting my nails", "memorize a speech", "start running",
    "remove a stain from a shirt", "make a paper airplane", "set up a home wifi network", "save money on groceries",
    "write a haiku", "train a puppy to sit", "brew iced coffee", "read faster", "sharpen a kitchen knife",
    "reduce screen time", "plan a birthday party", "hang a picture frame", "learn to code", "make pancakes",
    "choose a good watermelon", "wash a wool sweater", "write a cover letter", "calm down before an exam",
    "keep a conversation going", "fix a slow computer", "make a smoothie", "pack a suitcase efficiently",
    "start journaling", "give constructive feedback", "ask for a raise", "cook rice on the stove",
    "keep houseplants alive", "make a website", "write a short story", "study for a math test", "meditate",
    "build a campfire safely", "choose a laptop", "make cold brew", "write a good email subject line",
]
HOWTO_TEMPLATES = [
    "How do I {k}?", "What is the easiest way to {k}?", "Give me step-by-step instructions to {k}.",
    "I have never tried to {k}. Can you help?", "What do I need to {k}?", "What are three tips to {k}?",
]
WRITING = [
    "a short email to my landlord about a leaking tap", "a thank-you note to a coworker", "a product description for a steel water bottle",
    "a slogan for a bike repair shop", "an invitation to a board game night", "a short speech for a retirement party",
    "a cover letter opening for a junior designer job", "a text message to cancel a dentist appointment",
    "a welcome message for new members of a book club", "a short review of a pizza restaurant",
    "a motivational message for a friend running a marathon", "a farewell card for a teacher",
    "an out-of-office reply", "a short bio for a freelance photographer", "a lost cat poster",
    "a toast for a best friend's wedding", "a complaint about a late delivery", "a note to a neighbour about noise",
    "a story for kids about a brave little boat", "a poem about Monday mornings", "a song chorus about summer",
    "a description of a busy market", "a letter to my future self", "an advertisement for a lemonade stand",
    "a recipe card for oatmeal cookies", "a packing list for a ski trip", "a weekly meal plan for one person",
    "a to-do list for moving house", "a short mystery story opening", "a dialogue between a robot and a cat",
]
WRITING_TEMPLATES = ["Write {w}.", "Please write {w}.", "Can you write {w}?", "Draft {w}.", "Help me write {w}."]
CODE = [
    "reverses a string", "checks whether a number is prime", "returns the largest number in a list",
    "counts the vowels in a string", "computes the factorial of n", "returns the nth Fibonacci number",
    "removes duplicates from a list", "checks whether a word is a palindrome", "sorts a list of names",
    "converts Celsius to Fahrenheit", "sums the even numbers in a list", "merges two sorted lists",
    "counts the words in a sentence", "finds the average of a list", "flattens a nested list",
    "capitalizes every word in a sentence", "checks whether a year is a leap year", "returns the greatest common divisor of two numbers",
    "reads a file and prints its lines", "validates an email address", "returns the second smallest number in a list",
    "converts a number to binary", "checks whether two strings are anagrams", "groups words by their first letter",
]
LANGUAGES = ["Python", "JavaScript", "Java", "C", "Go", "Rust", "TypeScript", "Ruby", "C++", "Bash"]
CODE_TEMPLATES = [
    "Write a {lang} function that {c}.", "How would I write a function in {lang} that {c}?",
    "Show me {lang} code that {c}, with comments.", "Write a {lang} function that {c} and explain how it works.",
]
CODE_QUESTIONS = [
    "What is a variable in programming?", "Explain what a for loop is.", "What is recursion?", "What is an API?",
    "What does a hash map do?", "Explain object-oriented programming.", "What is a unit test?", "What is JSON?",
    "Write a SQL query that counts the rows of a table named users.", "What is the difference between == and is in Python?",
    "Explain what Big O notation means.", "What is a race condition?", "How does a binary search work?",
    "What is an index in a database?", "Explain the difference between a process and a thread.",
]
REWRITE_TEMPLATES = [
    "Rewrite this sentence to sound more formal: {s}", "Fix the grammar in this sentence: {s}",
    "Make this sentence simpler: {s}", "Summarize this in a few words: {s}", "Translate into French: {s}",
    "Translate into Spanish: {s}", "Rewrite this in a friendly tone: {s}", "Turn this into a question: {s}",
    "Repeat this sentence back to me exactly: {s}", "Make this sentence shorter: {s}",
]
SUBJECTS = ["my brother", "the manager", "our team", "the little dog", "my neighbour", "the old teacher", "the company",
            "my friend Sam", "the students", "the chef"]
VERBS = ["want to finish", "forgot to send", "is going to fix", "really likes", "never understood", "will present",
         "have to clean", "decided to sell", "can't find", "wanted to change"]
OBJECTS = ["the report before friday", "the big red car", "the new kitchen", "our weekly plan", "the broken window",
           "the project results", "the garden fence", "the birthday cake", "the meeting notes", "the blue bicycle"]
ADVICE = [
    "I feel stressed about my exams.", "I can't stop procrastinating.", "My roommate is messy.", "I am bored at work.",
    "I want to eat healthier but I love sweets.", "I have trouble waking up early.", "I am nervous about a presentation.",
    "My friend forgot my birthday.", "I want to change careers.", "I have too many browser tabs open all the time.",
    "I keep forgetting people's names.", "I want to get back into reading.", "I spend too much money on takeout.",
    "My plants keep dying.", "I want to be more confident.", "I don't know what to cook tonight.",
]
ADVICE_TEMPLATES = ["{a} What should I do?", "{a} Any advice?", "{a} Give me three ideas.", "{a} Can you help me?"]
BRAINSTORM = [
    ("names", "a coffee shop"), ("names", "a fantasy kingdom"), ("names", "a robot"), ("names", "a podcast about history"),
    ("ideas", "a rainy weekend with kids"), ("ideas", "a team-building event"), ("ideas", "a cheap date"),
    ("ideas", "a school project about space"), ("ideas", "healthy snacks"), ("ideas", "a short film"),
    ("titles", "a mystery novel"), ("titles", "a blog about gardening"), ("gift ideas", "a dad who likes fishing"),
    ("questions", "an interview with a scientist"), ("ideas", "a themed dinner party"), ("names", "a hiking club"),
    ("slogans", "a recycling campaign"), ("ideas", "a mobile app for students"), ("activities", "a summer camp"),
]
BRAINSTORM_TEMPLATES = ["Suggest {n} {kind} for {what}.", "Give me {n} {kind} for {what}.", "Brainstorm {n} {kind} for {what}."]
FACTS = [
    "What is the capital of {x}?", "What language is spoken in {x}?", "What is {x} famous for?",
    "Tell me three facts about {x}.", "What is the weather like in {x}?", "What food is {x} known for?",
]
COUNTRIES = ["Japan", "Brazil", "Kenya", "Canada", "Norway", "Egypt", "India", "Mexico", "Australia", "Italy", "Peru",
             "Vietnam", "Morocco", "Iceland", "Argentina", "Greece", "Thailand", "Poland", "Chile", "Ireland", "Spain"]
SCENES = ["a busy train station", "a quiet library", "a snowy village", "a desert at noon", "a farmers market",
          "a thunderstorm over a field", "a crowded stadium", "an old bookshop", "a spaceship cockpit",
          "a forest in spring", "a lighthouse in a storm", "a night market in Asia", "a mountain lake at dawn"]
SCENE_TEMPLATES = ["Describe {s}.", "Describe {s} in three sentences.", "Write a vivid paragraph about {s}.",
                   "What would you hear and smell in {s}?"]
ROLES = ["a pirate", "a tour guide", "a friendly robot", "a medieval knight", "a chef", "a detective", "a astronaut",
         "a personal trainer", "a librarian", "a wizard"]
ROLE_REQUESTS = ["Introduce yourself.", "Tell me about your day.", "Give me advice about {t}.", "Explain {t}."]
RECOMMEND = [("books", "a teenager"), ("movies", "a family night"), ("board games", "two players"),
             ("exercises", "a beginner"), ("podcasts", "a long drive"), ("hobbies", "a retired person"),
             ("songs", "a road trip"), ("apps", "learning languages"), ("plants", "a dark room"), ("snacks", "a movie night")]
SUFFIXES = [" Answer in two sentences.", " Use bullet points.", " Keep it under 50 words.", " Explain like I'm five.",
            " Be brief.", " Give an example.", " Answer in one paragraph.", " Use a numbered list."]


def _math(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 12)
    return rng.choice([
        f"What is {a} times {b}?", f"What is {a * c} divided by {c}?", f"What is {a} plus {b} minus {c}?",
        f"I have {a} apples and give away {min(a, b) // 2}. How many are left?",
        f"A train travels {a} km in {c} hours. What is its average speed?",
        f"Convert {a} kilometres to miles.", f"What is {c} percent of {a * 10}?",
        f"If a shirt costs {a} dollars and is {c * 5} percent off, what is the new price?",
        f"Solve for x: {c}x + {a} = {a + c * b}.", f"Is {a * b + 1} a prime number?",
        f"A recipe needs {c} eggs for {c * 2} people. How many eggs for {c * 3} people?",
        f"How many minutes are in {c} hours and {a % 60} minutes?",
    ])


def _generators() -> list[tuple[int, Callable[[random.Random], str]]]:
    """(weight, generator) per task kind; weights roughly follow how often people ask each kind."""
    def sentence(rng: random.Random) -> str:
        return f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."

    def brainstorm(rng: random.Random) -> str:
        kind, what = rng.choice(BRAINSTORM)
        return rng.choice(BRAINSTORM_TEMPLATES).format(n=rng.choice(["three", "five", "ten", "some"]), kind=kind, what=what)

    def compare(rng: random.Random) -> str:
        a, b = rng.choice(PAIRS)
        return rng.choice(COMPARE_TEMPLATES).format(a=a, b=b)

    def recommend(rng: random.Random) -> str:
        kind, audience = rng.choice(RECOMMEND)
        return f"Recommend {rng.choice(['three', 'five', 'a few'])} {kind} for {audience}."

    def role(rng: random.Random) -> str:
        return f"Pretend you are {rng.choice(ROLES)}. " + rng.choice(ROLE_REQUESTS).format(t=rng.choice(TOPICS))

    return [
        (40, lambda rng: rng.choice(TOPIC_TEMPLATES).format(t=rng.choice(TOPICS))),
        (10, lambda rng: rng.choice(HOWTO_TEMPLATES).format(k=rng.choice(TASKS))),
        (6, compare),
        (8, lambda rng: rng.choice(WRITING_TEMPLATES).format(w=rng.choice(WRITING))),
        (7, lambda rng: rng.choice(CODE_TEMPLATES).format(lang=rng.choice(LANGUAGES), c=rng.choice(CODE))),
        (2, lambda rng: rng.choice(CODE_QUESTIONS)),
        (5, _math),
        (6, lambda rng: rng.choice(REWRITE_TEMPLATES).format(s=sentence(rng))),
        (4, lambda rng: rng.choice(ADVICE_TEMPLATES).format(a=rng.choice(ADVICE))),
        (4, brainstorm),
        (3, lambda rng: rng.choice(FACTS).format(x=rng.choice(COUNTRIES))),
        (3, lambda rng: rng.choice(SCENE_TEMPLATES).format(s=rng.choice(SCENES))),
        (2, role),
        (2, recommend),
    ]


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def similarity(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def heldout_prompts() -> list[str]:
    return json.loads(HELDOUT.read_text())


def generate(count: int = 6000, seed: int = 0) -> list[str]:
    """`count` distinct prompts (fewer if the templates run out), deterministic for a seed; none
    near a held-out chat prompt."""
    rng = random.Random(seed)
    generators = _generators()
    weights = [w for w, _ in generators]
    held = [words(p) for p in heldout_prompts()]
    seen: set[str] = set()
    out: list[str] = []
    for _ in range(count * 20):
        if len(out) >= count:
            break
        prompt = rng.choices(generators, weights)[0][1](rng)
        if rng.random() < 0.2 and prompt.endswith(("?", ".")) and ":" not in prompt:
            prompt += rng.choice(SUFFIXES)
        if prompt in seen or any(similarity(words(prompt), h) >= NEAR for h in held):
            continue
        seen.add(prompt)
        out.append(prompt)
    return out
