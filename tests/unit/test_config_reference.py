"""The configuration reference names every key of the jobs' config, with its default."""

from align.config import Config
from align.config.reference import default_text, job_reference, section_class, type_name


def _keys(cls, prefix=""):
    for name, info in cls.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        yield path
        sub = section_class(info.annotation)
        if sub is not None:
            yield from _keys(sub, path)


def test_every_key_of_the_config_has_a_row():
    text = job_reference()
    missing = [k for k in _keys(Config) if f"| `{k}` |" not in text]
    assert not missing


def test_defaults_come_from_the_section_where_they_differ():
    text = job_reference()
    # pretrain is finetune's class with its own defaults; nested pools keep their own sizes.
    assert '| `pretrain.objective` | `dpo`, `contrastive` | `"contrastive"` |' in text
    assert '| `finetune.objective` | `dpo`, `contrastive` | `"dpo"` |' in text
    assert "| `index_corpus.decode.batch_size` | int, >= 1 | `128` |" in text
    assert "| `index_corpus.embed.batch_size` | int, >= 1 | `256` |" in text


def test_types_and_long_defaults_read_plainly():
    assert type_name(str | None) == "str or null"
    assert type_name(dict[str, int]) == "dict[str, int]"
    assert type_name(tuple[int, ...]) == "tuple[int, ...]"
    long = default_text("x" * 500)
    assert long.startswith('`"xxx') and long.endswith("(502 characters)`")
