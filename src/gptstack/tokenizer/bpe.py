"""Byte-level BPE training: regex pre-split, then the incremental merge algorithm.

The trainer counts each distinct pre-split chunk once, keeps the count of every adjacent token
pair and an index pair -> chunks that contain it, and after each merge updates only the chunks
that merge touched (the algorithm of HF `tokenizers` and SentencePiece). minbpe's loop recounts
every pair of the whole corpus after every merge: O(merges x corpus) instead of O(touched).

Merge order is deterministic: the most frequent pair wins; ties go to the smallest (left id,
right id), independent of the order the text arrived in.
"""
from __future__ import annotations

import heapq
import multiprocessing
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor

import regex

from ..common import UserError

# Pre-split patterns. GPT-2's and GPT-4's (cl100k) are tiktoken's own strings, so a chunk here is
# the same chunk tiktoken's encoder sees. `digits` is GPT-4's with numbers split into single
# digits (as Llama does): arithmetic is far easier to learn when "1234" is always 1,2,3,4 rather
# than whatever 1-3 digit groups BPE happened to merge (see docs/LOG.md for the measured effect).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
DIGITS_PATTERN = GPT4_PATTERN.replace(r"\p{N}{1,3}+", r"\p{N}")
# No pre-split: the whole text is one chunk (minbpe's BasicTokenizer). For tiktoken a regex that
# matches everything in one piece.
NO_SPLIT_PATTERN = r"[\s\S]+"

PATTERNS = {
    "gpt2": GPT2_PATTERN,
    "gpt4": GPT4_PATTERN,
    "cl100k": GPT4_PATTERN,
    "digits": DIGITS_PATTERN,
    "none": NO_SPLIT_PATTERN,
}


def resolve_pattern(pattern: str | None) -> str:
    """A built-in name (gpt2, gpt4/cl100k, digits, none) or a regex -> the regex, validated."""
    if pattern is None:
        return NO_SPLIT_PATTERN
    regex_str = PATTERNS.get(pattern, pattern)
    if not regex_str:
        raise UserError("pattern: empty regex (use 'none' for no pre-split)")
    try:
        compiled = regex.compile(regex_str)
    except regex.error as e:
        raise UserError(f"pattern: invalid regex {regex_str!r}: {e}") from None
    if compiled.fullmatch("") is not None:
        raise UserError(f"pattern: regex {regex_str!r} matches the empty string; every chunk must be non-empty")
    return regex_str


def sanitize(text: str) -> str:
    """Replace lone surrogates (not encodable as UTF-8) with U+FFFD, exactly as tiktoken does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _count_serial(texts: list[str], pattern: str) -> Counter[str]:
    split = regex.compile(pattern).findall
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(split(text))
    return counts


# A cut between a letter+newline and a letter is a chunk boundary for every built-in pattern (no
# alternative carries a letter run across a newline, and the newline before a letter is a chunk
# of its own), so pieces cut there split exactly as the whole text does. A custom regex carries
# no such guarantee: its text is never cut.
_SAFE_CUT = regex.compile(r"(?<=\p{L}\n)(?=\p{L})")
_PARALLEL_MIN_CHARS = 1 << 20


def _cut(text: str, n_pieces: int) -> list[str]:
    pieces, start = [], 0
    step = len(text) // n_pieces
    for k in range(1, n_pieces):
        m = _SAFE_CUT.search(text, max(start, k * step))
        if m is None:
            break
        pieces.append(text[start : m.start()])
        start = m.start()
    pieces.append(text[start:])
    return pieces


def count_chunks(texts: Iterable[str], pattern: str, num_workers: int | None = None) -> Counter[str]:
    """How often each distinct pre-split chunk occurs in `texts`.

    Counting distinct chunks first is what makes BPE training cheap: 9.5 MB of English has
    ~18k distinct chunks, so merges then work on 18k short words, not 2M chunk occurrences.
    The regex scan is the costliest part of training; on more than 1 MB it runs on
    `num_workers` forked processes (default: all cores), with identical counts.
    """
    texts = [sanitize(t) for t in texts]
    total = sum(len(t) for t in texts)
    workers = num_workers or os.cpu_count() or 1
    safe_to_cut = pattern in (GPT2_PATTERN, GPT4_PATTERN, DIGITS_PATTERN)
    if workers == 1 or total < _PARALLEL_MIN_CHARS or (len(texts) < workers and not safe_to_cut):
        return _count_serial(texts, pattern)
    # ~4 pieces per worker balances load; each piece keeps whole documents or safe cuts.
    pieces: list[str] = []
    for t in texts:
        n = max(1, round(4 * workers * len(t) / total))
        pieces += _cut(t, n) if safe_to_cut else [t]
    jobs: list[list[str]] = [[] for _ in range(workers)]
    sizes = [0] * workers
    for piece in sorted(pieces, key=len, reverse=True):  # largest first onto the least loaded
        k = sizes.index(min(sizes))
        jobs[k].append(piece)
        sizes[k] += len(piece)
    # fork: the children inherit the text through _FORKED_JOBS instead of pickling megabytes.
    global _FORKED_JOBS
    _FORKED_JOBS = (jobs, pattern)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            counts: Counter[str] = Counter()
            for c in pool.map(_count_forked_job, [k for k, job in enumerate(jobs) if job]):
                counts.update(c)
    finally:
        _FORKED_JOBS = None
    return counts


_FORKED_JOBS: tuple[list[list[str]], str] | None = None


def _count_forked_job(k: int) -> Counter[str]:
    jobs, pattern = _FORKED_JOBS
    return _count_serial(jobs[k], pattern)


def train_bpe(
    chunk_counts: dict[bytes, int], num_merges: int, progress: bool | None = None
) -> list[bytes]:
    """Learn up to `num_merges` merges; return the vocabulary: 256 byte tokens, then one token
    per merge, in rank order (the id of a token is its position).

    Stops early when no pair occurs any more (the corpus is too small for the vocabulary).
    """
    from tqdm.auto import tqdm

    words = [list(chunk) for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    token_bytes = [bytes([b]) for b in range(256)]
    token_id = {t: i for i, t in enumerate(token_bytes)}

    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_count[pair] += count
            pair_words[pair].add(w)
    # Max-heap by count, ties to the smallest pair. Entries go stale when a count changes; a fresh
    # entry is pushed with every change, and stale ones are skipped when popped.
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)

    # progress None: a bar only on a terminal; True/False force it on/off.
    bar = tqdm(total=num_merges, desc="bpe merges", unit="merge", disable=None if progress is None else not progress)
    merges_done = 0
    while merges_done < num_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_count.get(pair) != -neg_count:
            continue
        left, right = pair
        merged = token_bytes[left] + token_bytes[right]
        # A merge can rebuild the bytes of a token that already exists (from another split):
        # reuse its id so ids and byte strings stay one-to-one, as tiktoken's ranks require.
        new_id = token_id.get(merged)
        if new_id is None:
            new_id = len(token_bytes)
            token_bytes.append(merged)
            token_id[merged] = new_id
            merges_done += 1
            bar.update(1)

        # Merge in every chunk that holds the pair; only the pairs beside each occurrence change.
        del pair_count[pair]
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for w in pair_words.pop(pair):
            word, count = words[w], counts[w]
            out: list[int] = []
            i, n = 0, len(word)
            while i < n:
                if word[i] == left and i + 1 < n and word[i + 1] == right:
                    if out:  # the left neighbour as it is now (may itself be new_id: "a b a b")
                        prev = out[-1]
                        delta[prev, left] -= count
                        delta[prev, new_id] += count
                        pair_words[prev, new_id].add(w)
                    if i + 2 < n:
                        nxt = word[i + 2]
                        delta[right, nxt] -= count
                        delta[new_id, nxt] += count
                        pair_words[new_id, nxt].add(w)
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[w] = out  # unchanged if the index entry was stale (an earlier merge took the pair)
        for p, d in delta.items():
            if d == 0 or p == pair:
                continue
            c = pair_count.get(p, 0) + d
            if c > 0:
                pair_count[p] = c
                heapq.heappush(heap, (-c, p))
            else:
                pair_count.pop(p, None)
    bar.close()
    return token_bytes
