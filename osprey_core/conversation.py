"""Prompts exactly as the official code builds them (spec §1.4–§1.5) and the paper's instruction
templates (supplementary tables A13–A15), so our numbers stay comparable with the published ones."""

from __future__ import annotations

SYSTEM_OSPREY_V1 = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# Training used the vicuna_v1 system prompt ("user" where inference says "human"; spec §1.4).
SYSTEM_VICUNA_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
REGION = "<mask><pos>"
OVERVIEW = "<image>\nThis provides an overview of the picture.\n"

# Task prompts (the `qs` after "USER: "), verbatim from the official eval/demo scripts.
CATEGORY_PROMPT = OVERVIEW + f"What is the category of {REGION}? Using only one word or phrase."
SHORT_PROMPT = (
    "<image>\n\nThis provides an overview of the picture.\n"
    f"Please give me a short description of {REGION}. Using a short phrase."
)
DETAILED_PROMPT = (
    "<image>\n\nThis provides an overview of the picture.\n" f"Can you give me a detailed description of {REGION}?"
)
OPEN_QUESTION_PREFIX = "<image>\n.\nThis provides an overview of the picture.\n"
# Attribute questions reuse the category wording with the attribute name (our extension).
ATTRIBUTE_PROMPT = OVERVIEW + "What is the {attribute} of " + REGION + "? Using only one word or phrase."


def chat_prompt(question: str, answers: list[tuple[str, str]] | None = None, system: str = SYSTEM_OSPREY_V1) -> str:
    """`osprey_v1` rendering (sep " ", sep2 "</s>"): earlier (question, answer) turns, then the open turn."""
    text = system + " "
    for q, a in answers or []:
        text += f"USER: {q} ASSISTANT: {a}</s>"
    return text + f"USER: {question} ASSISTANT:"


def training_conversation(turns: list[tuple[str, str]], system: str = SYSTEM_VICUNA_V1) -> str:
    """A whole training sample as `conv_vicuna_v1` renders it: every answer closed by `</s>`."""
    text = system + " "
    for q, a in turns:
        text += f"USER: {q} ASSISTANT: {a}</s>"
    return text


def category_question() -> str:
    return CATEGORY_PROMPT


def attribute_question(attribute: str) -> str:
    return ATTRIBUTE_PROMPT.format(attribute=attribute.replace("_", " ").strip())


def description_question(detail: str) -> str:
    if detail == "short":
        return SHORT_PROMPT
    if detail == "detailed":
        return DETAILED_PROMPT
    raise ValueError(f"detail must be 'short' or 'detailed', got {detail!r}")


def open_question(question: str) -> str:
    """A free question about one region: `<region>` marks where it goes (the eval convention); without
    it the region is introduced the way Osprey-724K conversations do ("Ther are 1 part region ...")."""
    question = question.strip()
    if "<region>" in question:
        return OPEN_QUESTION_PREFIX + question.replace("<region>", REGION)
    return OPEN_QUESTION_PREFIX + multi_region_intro(1) + question


def multi_region_intro(n: int) -> str:
    """The literal Osprey-724K region list (typo included: the model was trained on it)."""
    if n == 1:
        return f"Ther are 1 part region in the picture: region1{REGION}. "
    regions = ",".join(f"region{i + 1}{REGION}" for i in range(n))
    return f"Ther are {n} part regions in the picture: {regions}. "


def postprocess_answer(text: str) -> str:
    """Official post-processing: strip, drop a trailing </s>, keep the segment after the first colon."""
    text = text.strip()
    if text.endswith("</s>"):
        text = text[: -len("</s>")].strip()
    if ":" in text:
        text = text.split(":")[1]
    return text.strip()


# --- Table A13: detailed mask-region description (verbatim; item 10 lacks the <region> tag in the paper) ---
DETAILED_TEMPLATES = [
    "Can you provide me with a detailed description of the region in the picture marked by <region>?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in detail?",
    "What can you tell me about the region indicated by <region> in the image?",
    "I'd like to know more about the area in the photo labeled <region>. Can you give me a detailed description?",
    "Could you describe the region shown as <region> in the picture in great detail?",
    "What details can you give me about the region outlined by <region> in the photo?",
    "Please provide me with a comprehensive description of the region marked with <region> in the image.",
    "Can you give me a detailed account of the region labeled as <region> in the picture?",
    "I'm interested in learning more about the region represented by <region> in the photo. Can you describe it in detail?",
    "What is the region outlined by region in the picture like? Could you give me a detailed description?",
    "Can you provide me with a detailed description of the region in the picture marked by <region>, please?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in detail, please?",
    "What can you tell me about the region indicated by <region> in the image, exactly?",
    "I'd like to know more about the area in the photo labeled <region>, please. Can you give me a detailed description?",
    "Could you describe the region shown as <region> in the picture in great detail please?",
    "What details can you give me about the region outlined by <region> in the photo, please?",
    "Please provide me with a comprehensive description of the region marked with <region> in the image, please.",
    "Can you give me a detailed account of the region labeled as <region> in the picture, please?",
    "I'm interested in learning more about the region represented by <region> in the photo. Can you describe it in detail, please?",
    "What is the region outlined by <region> in the picture like, please? Could you give me a detailed description?",
    "Please describe the region <region> in the image in detail.",
    "Can you offer a thorough analysis of the region <region> in the image?",
    "Could you elaborate on the region highlighted by <region> in the picture provided?",
    "Please share more information about the zone emphasized with <region> in the photo.",
    "What insights can you give about the area denoted by <region> in the image presented?",
    "Can you share a comprehensive rundown of the region denoted by <region> in the presented image?",
    "I'd like to know more about the region highlighted by <region> in the picture provided.",
    "Work through the important details of the area <region> in the image.",
    "Illustrate the area represented by <region> through a descriptive explanation.",
    "Examine the region <region> closely and share its details.",
]

# --- Table A14: brief mask-region description ---
SHORT_TEMPLATES = [
    "Please give me a short description of region <region>.",
    "Can you give me a short description of <region>?",
    "Can you provide me with a short description of the region in the picture marked by <region>?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in few words?",
    "What can you tell me about the region indicated by <region> in the image in few words?",
    "I'd like to know more about the area in the photo labeled <region>. Can you give me a concise description?",
    "Could you describe the region shown as <region> in the picture concisely?",
    "What can you give me about the region outlined by <region> in the photo?",
    "Please provide me with a brief description of the region marked with <region> in the image.",
    "Can you give me a brief introduction of the region labeled as <region> in the picture?",
    "I'm interested in knowing the region represented by <region> in the photo. Can you describe it in several words?",
    "What is the region outlined by <region> in the picture like? Could you give me a streamlined description?",
    "Can you provide me with a brief description of the region in the picture marked by <region> please?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in few words please?",
    "What can you tell me about the region indicated by <region> in the image?",
    "I'd like to know more about the area in the photo labeled <region> please. Can you give me a simple description?",
    "Could you describe the region shown as <region> in the picture in several words?",
    "What attributes can you give me about the region outlined by <region> in the photo please?",
    "Please provide me with a simple description of the region marked with <region> in the image please.",
    "I'm interested in learning more about the region represented by <region> in the photo. Can you describe it in few words please?",
    "What is the region outlined by <region> in the picture like please? Could you give me a simple and clear description?",
    "Please describe the region <region> in the image concisely.",
    "Can you offer a simple analysis of the region <region> in the image?",
    "Could tell me something about the region highlighted by <region> in the picture briefly?",
    "Please share some information about the zone emphasized with <region> in the photo.",
    "What insights can you give about the area denoted by <region> in the image presented?",
    "Can you share a simple rundown of the region denoted by <region> in the presented image?",
    "I'd like to know some attributes about the region highlighted by <region> in the picture provided.",
    "Work through the important attributes of the area <region> in the image.",
    "Illustrate the area represented by <region> with some important attributes.",
]

# --- Table A15: positive/negative category questions ---
POSNEG_TEMPLATES = [
    "<category> is the category of <region>, right?",
    "Is the category of <region> <category>?",
    "Does this area <region> belong to category <category>?",
    "Is <category> the appropriate classification for this area <region>?",
    "Does category <category> accurately describe this region <region>?",
    "The category of <region> is <category>, right?",
    "Is this area <region> classified under category <category>?",
    "Is it correct to say this area <region> falls into category <category>?",
    "Is the classification of this region <region> aligned with category <category>?",
]
