"""The tokenizer that goes with a Hugging Face export: the run's tokenizer.json (found by the digest its shards
record), or a README.md saying what the ids mean where no Hugging Face tokenizer file can be written here.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

README = "README.md"
TOKENIZER = "tokenizer.json"
# Files that belong with a tokenizer.json when they sit next to it (a model folder's tokenizer).
COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json")
WRITTEN = (README, TOKENIZER, *COMPANIONS)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_tokenizer_json(spec: str, meta: dict, override: str | None = None) -> Path | None:
    """The tokenizer.json whose digest the spec records ('hf:NAME:SHA12'), looked for where a run keeps it:
    --tokenizer hf:PATH, the model.init_from folder, data.dir and its buckets. None when not found."""
    parts = spec.split(":")
    recorded = ((meta.get("run") or {}).get("tokenizer") or spec).split(":")
    want = recorded[2] if len(recorded) > 2 and recorded[0] == "hf" else None  # the file the run trained with
    config = ((meta.get("run") or {}).get("config") or {})
    places = []
    if override and override.startswith("hf:"):
        places.append(Path(override[3:]))
    if len(parts) == 2:  # a spec that names its file (an override, or a run's own hf:PATH)
        places.append(Path(parts[1]))
    init_from = (config.get("model") or {}).get("init_from")
    if init_from:
        places.append(Path(init_from) / TOKENIZER)
    data_dir = Path((config.get("data") or {}).get("dir") or "")
    if str(data_dir) not in ("", ".") and data_dir.is_dir():
        places += [data_dir / TOKENIZER, *sorted(data_dir.glob(f"*/{TOKENIZER}"))]
    for path in places:
        if path.is_file() and (want is None or _digest(path).startswith(want)):
            return path
    return None


def eos_of(spec: str | None, found: Path | None = None) -> int | None:
    """The end-of-document id of the run's tokenizer, where it can be known here."""
    from gpt_simple.data.tokenizer import get_tokenizer
    if found is not None:
        spec = f"hf:{found}"
    try:
        return get_tokenizer(spec).eos if spec else None
    except (ValueError, OSError):  # a recorded hf id that names no file here, tiktoken not installed
        return None


def write_tokenizer(out: Path, spec: str | None, meta: dict, override: str | None, layout: str
                    ) -> tuple[str, int | None]:
    """Put the tokenizer (or what is known of it) into the export folder; returns (one line saying what, the
    end-of-document id or None)."""
    for name in WRITTEN:  # an earlier export's tokenizer must not stay next to another model
        (out / name).unlink(missing_ok=True)
    found = find_tokenizer_json(spec, meta, override) if spec and spec.startswith("hf:") else None
    if found is not None:
        shutil.copyfile(found, out / TOKENIZER)
        for name in COMPANIONS:
            if (found.parent / name).is_file():
                shutil.copyfile(found.parent / name, out / name)
        return f"tokenizer: {found} copied", eos_of(spec, found)
    note, text = _described(spec)
    (out / README).write_text(f"# {out.name}\n\nA gpt-simple export in the Hugging Face {layout} layout "
                              f"(config.json, model.safetensors).\n\n## Tokenizer\n\n{text}\n")
    return note, eos_of(spec)


def _described(spec: str | None) -> tuple[str, str]:
    """(the CLI's note, README.md's tokenizer section) where no tokenizer file goes with the export."""
    if spec and spec.startswith("hf:"):
        return (f"tokenizer: {spec} not found; pass --tokenizer hf:PATH/tokenizer.json (see README.md)",
                f"The run's data was tokenized with the Hugging Face tokenizer `{spec}` (file name and the first 12 "
                f"hex digits of its SHA-256), which was not found here. Copy that `tokenizer.json` into this folder, "
                f"or export again with `--tokenizer hf:PATH/tokenizer.json`.")
    if spec and spec.startswith("tiktoken:"):
        name = spec.split(":", 1)[1]
        same = (" It is the same BPE as Hugging Face's GPT-2 tokenizer: `AutoTokenizer.from_pretrained("
                "\"openai-community/gpt2\")` loads that from the Hub.") if name == "gpt2" else ""
        return (f"tokenizer: tiktoken:{name}, no tokenizer file (see README.md)",
                f"The run's data was tokenized with tiktoken's `{name}` encoding. No Hugging Face tokenizer file is "
                f"written: converting it needs the encoding's BPE file, which tiktoken downloads, and export works "
                f"offline.{same} Token ids are tiktoken's; end of document is `<|endoftext|>`.")
    if spec == "byte":
        return ("tokenizer: byte-level (ids described in README.md)",
                "Byte-level ids, no tokenizer file: id `b` (0 to 255) is the byte `b` of the UTF-8 text; id 256 is "
                "end of document (`eos_token_id` and `bos_token_id` in config.json); ids from 257 up to "
                "`vocab_size` - 1 are padding rows the data never uses.\n\n```python\n"
                "ids = list(text.encode(\"utf-8\"))\n"
                "text = bytes(i for i in ids if i < 256).decode(\"utf-8\", errors=\"replace\")\n```")
    return "tokenizer: unknown (pass --tokenizer SPEC)", "The checkpoint does not record its tokenizer."
