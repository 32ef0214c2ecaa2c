"""The built-in task world: prompts with verifiable answers, a gold reward and a simulated labeler.

    from gptstack import world
    config = world.WorldConfig()                        # the `tiny` recipe embeds one
    tasks = world.train_tasks(1000, seed=0, config=config)   # never an eval item
    evals = world.eval_set(config)                      # fixed: 100 per family, 500 in all
    t = tasks[0]; t.prompt, t.steps, t.reference, t.answer, t.messages()
    world.gold(t, "3 + 4 = 7.\\nThe answer is 7.")      # float in [0, 1]; world.score(...) for its parts
    world.is_correct(t, response); world.check_steps(t, response).first_error
    world.answer_key(t, response)                       # its final answer, canonical (None: none)
    world.demonstrations(1000, seed=0, config=config)     # (task, style, response): styles by config.style_mix
    world.style_of(response)                            # terse, standard, explained, checked, chatty or other
    world.Labeler.from_config(config).rank(t, responses, rng)   # indices, best first
    world.documents(n_chars, seed, config)              # pretraining documents (+ English)
    world.task_from_prompt("What is 2 + 3?")            # any world prompt back to its task
    world.task_from_messages(messages)                  # the same for a one-turn conversation, else None

See tasks.py (families, decontamination), styles.py (the ways a task can be answered), gold.py (the reward formula, the step checker),
labeler.py (Bradley-Terry / Plackett-Luce noise and biases), documents.py (pretraining text).
"""
from ..data.comparisons import ranking_pairs as ranking_to_pairs  # the pairs every stage uses, by the world's name
from .documents import documents, english_documents, task_document, world_documents
from .gold import (GoldScore, StepCheck, answer_key, check_steps, extract_answer, gold, is_correct, score,
                   split_steps, step_labels, summarize)
from .labeler import Judgement, Labeler
from .styles import STYLES, describe, style_of, words
from .tasks import (FAMILIES, LEVELS, EvalIndex, Task, WorldConfig, as_task, demonstrations, eval_index,
                    eval_set, generate, task_from_messages, task_from_prompt, task_stream, train_tasks, vocabulary)

__all__ = [
    "FAMILIES", "LEVELS", "STYLES", "demonstrations", "describe", "style_of", "words", "EvalIndex", "GoldScore", "Judgement", "Labeler", "StepCheck", "Task", "WorldConfig",
    "answer_key", "as_task", "check_steps", "documents", "english_documents", "eval_index", "eval_set", "extract_answer",
    "generate", "gold", "is_correct", "ranking_to_pairs", "score", "split_steps", "step_labels", "summarize",
    "task_document", "task_from_messages", "task_from_prompt", "task_stream", "train_tasks", "vocabulary", "world_documents",
]
