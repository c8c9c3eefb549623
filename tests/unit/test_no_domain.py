"""No domain in the library: nothing in Tide's packages names an example's fields or domain.

Every file under the packages is read (code, Lua, SQL, Avro schemas, Dockerfiles, docs) and split into
lower-cased word tokens (``card_id`` and ``cardId`` are ``card`` + ``id``; ``cardinality`` is one token);
a token that is one of the examples' domain words (or its plural), or an identifier that is one of their
multi-word field names, fails the test with file, line and word. Examples live in ``examples/``, tests
in ``tests/``; neither is checked.

Conversely, the examples use only Tide's public API (``tide``, ``tide.Client``, the demo handle) and
ordinary libraries: never the packages underneath.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("streams", "features", "online_training", "serving", "schemas", "infra", "models", "tide")

# The fraud example (examples/fraud): its domain nouns and its field and feature names.
FRAUD_WORDS = {"card", "fraud", "fraudulent", "merchant", "chargeback", "txn", "payment", "amount", "country"}
FRAUD_FIELDS = {"card_id", "merchant_id", "card_present", "is_fraud"}
# The food-delivery example (examples/food_delivery).
FOOD_WORDS = {"restaurant", "courier", "cuisine", "daypart", "kitchen", "vehicle", "eta", "food"}
FOOD_FIELDS = {"order_id", "distance_km", "pace_min_per_km", "placed_ts", "delivery_minutes"}

WORDS = FRAUD_WORDS | FOOD_WORDS
FIELDS = FRAUD_FIELDS | FOOD_FIELDS
_FIELD = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(sorted(FIELDS)) + r")(?![A-Za-z0-9_])", re.IGNORECASE)
_SPLIT = re.compile(r"[^A-Za-z0-9]+")
_CAMEL = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_SKIP_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


def tokens(line: str) -> set[str]:
    out = set()
    for part in _SPLIT.split(line):
        out.update(t.lower() for t in _CAMEL.findall(part))
    return out


def domain_words(line: str) -> list[str]:
    """The domain words and field names ``line`` holds."""
    found = {m.group(1).lower() for m in _FIELD.finditer(line)}
    for token in tokens(line):
        for word in WORDS:
            if token in (word, word + "s", word + "es"):
                found.add(word)
    return sorted(found)


def package_files() -> list[Path]:
    files = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*")):
            if path.is_file() and not _SKIP_DIRS & set(path.parts):
                files.append(path)
    return files


def test_the_tokeniser_finds_words_not_substrings() -> None:
    assert domain_words("x = record['card_id']") == ["card", "card_id"]
    assert domain_words("def readCardActivity():") == ["card"]
    assert domain_words("cardinality of the discard pile; scratchpad") == []
    assert domain_words("Restaurants and couriers") == ["courier", "restaurant"]
    assert domain_words("beta, theta, metadata") == []


def test_no_package_names_an_example_domain() -> None:
    matches = []
    for path in package_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
        for number, line in enumerate(text.splitlines(), start=1):
            if words := domain_words(line):
                rel = path.relative_to(ROOT)
                matches.append(f"{rel}:{number}: {', '.join(words)}: {line.strip()[:120]}")
    assert not matches, f"{len(matches)} lines name an example's domain:\n" + "\n".join(matches)


PUBLIC = {"tide", "tide.client", "tide.demo"}
LIBRARIES = {"river", "numpy", "torch", "httpx", "aiohttp", "orjson", "confluent_kafka"}


def imported(path: Path) -> set[str]:
    """The absolute module names ``path`` imports (relative imports stay inside its package)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def test_examples_use_only_the_public_api() -> None:
    wrong = []
    for path in sorted((ROOT / "examples").rglob("*.py")):
        project = path.relative_to(ROOT / "examples").parts[0]
        own = {p.stem for p in (ROOT / "examples" / project).glob("*.py")}  # the project's own modules
        for module in sorted(imported(path)):
            top = module.split(".")[0]
            if (
                module in PUBLIC
                or top in LIBRARIES | own
                or top in sys.stdlib_module_names
                or top == "__future__"
            ):
                continue
            wrong.append(f"{path.relative_to(ROOT)}: imports {module}")
    assert not wrong, "examples must use only Tide's public API:\n" + "\n".join(wrong)
