"""Scene -> caption in the style of the prompt templates, and the words captions can use.

"a photo of a red star on a green background"; sizes other than medium, textures and
background patterns add one word each: "a rendering of a small red striped star on a green
checkered background".
"""
from __future__ import annotations

from typing import Optional

from spacetime_jax.data.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES
from spacetime_jax.toyworld.scene import COLORS, TEXTURES, Background, Scene
from spacetime_jax.toyworld.shapes import SHAPES

DEFAULT_TEMPLATE = "a photo of a {}"
_SIZE_WORDS = ("small", "large")  # medium is the unmarked size
_BACKGROUND_WORDS = {"plain": None, "gradient": "gradient", "checkered": "checkered",
                     "striped": "striped"}
_FIXED_WORDS = ("on", "a", "an", "background")


def object_phrase(scene: Scene, with_size: bool = True) -> str:
    """'small red striped star'; a two-tone texture reads 'blue and white striped arrow'."""
    words = [scene.size] if with_size and scene.size in _SIZE_WORDS else []
    words.append(scene.color if scene.accent is None else f"{scene.color} and {scene.accent}")
    if scene.texture != "plain":
        words.append(scene.texture)
    words.append(scene.shape)
    return " ".join(words)


def background_phrase(background: Background) -> str:
    """'an orange background', 'a green checkered background'."""
    pattern = _BACKGROUND_WORDS[background.kind]
    words = [background.color] + ([pattern] if pattern else []) + ["background"]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + words)


def caption(scene: Scene, template: Optional[str] = None) -> str:
    """The template (an object template with one `{}`) filled with the object, then where it is.
    A template that already says small or large gets no size word of its own."""
    template = DEFAULT_TEMPLATE if template is None else template
    with_size = not any(word in template.split() for word in _SIZE_WORDS)
    where = background_phrase(scene.background)
    return f"{template.format(object_phrase(scene, with_size))} on {where}"


def world_vocabulary() -> list[str]:
    """Sorted words of every pretraining caption and of both template lists (split on spaces,
    so 'close-up' is one word). Held-out shapes and two-tone 'and' are deliberately absent:
    pretraining never writes them."""
    words = set(_FIXED_WORDS) | set(COLORS) | set(SHAPES) | set(_SIZE_WORDS)
    words |= {t for t in TEXTURES if t != "plain"}
    words |= {w for w in _BACKGROUND_WORDS.values() if w}
    for template in OBJECT_TEMPLATES + STYLE_TEMPLATES:
        words |= set(template.replace("{}", " ").split())
    return sorted(words)
