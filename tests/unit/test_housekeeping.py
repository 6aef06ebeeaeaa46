"""The housekeeping matcher with the prompts front ends really send (copied from their sources), and with ordinary
image prompts that must never be mistaken for one."""

from __future__ import annotations

from typing import Any

import pytest

from relay.config import ConfigError, parse_config
from relay.core import housekeeping
from relay.core.housekeeping import HEAD_CHARS, Matcher, compile_pattern, texts_of

HISTORY = (
    "<chat_history>\nUSER: a lighthouse at dusk\nASSISTANT: ![Midjourney grid](http://x/grid.png)\n</chat_history>"
)

# Open WebUI (backend/open_webui/config.py), each sent as the one user message of a task request.
OPEN_WEBUI_TITLE = (
    "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n### Guidelines:\n"
    "- The title should clearly represent the main theme or subject of the conversation.\n"
    '### Output:\nJSON format: { "title": "your concise title here" }\n### Chat History:\n' + HISTORY
)
OPEN_WEBUI_TITLE_NEW = (
    "### Task:\nGenerate a concise title summarizing the chat history.\n### Guidelines:\n"
    "- Keep it short: 2-4 words is best.\n" + HISTORY
)
OPEN_WEBUI_TAGS = (
    "### Task:\nGenerate 1-3 broad tags categorizing the main themes of the chat history, along with 1-3 more "
    "specific subtopic tags.\n\n### Guidelines:\n- Start with high-level domains\n" + HISTORY
)
OPEN_WEBUI_FOLLOW_UPS = (
    "### Task:\nSuggest 3-5 relevant follow-up questions or prompts that the user might naturally ask next in this "
    "conversation as a **user**, based on the chat history, to help continue or deepen the discussion.\n" + HISTORY
)
OPEN_WEBUI_QUERIES = (
    "### Task:\nAnalyze the chat history to determine the necessity of generating search queries, in the given "
    "language. By default, **prioritize generating 1-3 broad and relevant search queries**\n" + HISTORY
)
OPEN_WEBUI_AUTOCOMPLETE = (
    "### Task:\nYou are an autocompletion system. Continue the text in `<text>` based on the **completion type** "
    "in `<type>` and the given language.  \n\n### **Instructions**:\n" + HISTORY + "\n<type>General</type>"
)
OPEN_WEBUI_IMAGE_PROMPT = (
    "### Task:\nGenerate a detailed prompt for am image generation task based on the given language and context. "
    "Describe the image as if you were explaining it to someone who cannot see it.\n" + HISTORY
)
OPEN_WEBUI_EMOJI = (
    "Your task is to reflect the speaker's likely facial expression through a fitting emoji. Interpret emotions "
    "from the message and reflect their facial expression using fitting, diverse emojis (e.g., 😊, 😢, 😡, 😱)."
    "\n\nMessage: ```a lighthouse at dusk```"
)
OPEN_WEBUI_TOOLS = (
    'Available Tools: [{"name": "web_search"}]\n\nYour task is to choose and return the correct tool(s) from the '
    "list of available tools based on the query. Follow these guidelines:"
)
# NextChat (app/locales/en.ts and cn.ts, Store.Prompt).
NEXTCHAT_TOPIC = (
    "Please generate a four to five word title summarizing our conversation without any lead-in, punctuation, "
    "quotation marks, periods, symbols, bold text, or additional text. Remove enclosing quotation marks."
)
NEXTCHAT_TOPIC_CN = (
    "使用四到五个字直接返回这句话的简要主题，"
    "不要解释、不要标点、不要语气词、不要多余文本，"
    "不要加粗，如果没有主题，请直接返回“闲聊”"
)
NEXTCHAT_SUMMARY = "Summarize the discussion briefly in 200 words or less to use as a prompt for future context."
NEXTCHAT_SUMMARY_CN = "简要总结一下对话内容，用作后续的上下文提示 prompt，控制在 200 字以内"
# LobeChat (packages/prompts/src/chains/*.ts): the instruction is the system message, the transcript the user's.
LOBECHAT_TITLE = (
    "You are a professional conversation summarizer. Generate a concise title that captures the essence of the "
    "conversation.\n\nRules:\n- Output ONLY the title text, no explanations or additional context\n- Maximum 10 words"
)
LOBECHAT_TITLE_CN = "你是一名擅长会话的助理，你需要将用户的会话总结为 10 个字以内的标题"
LOBECHAT_SUMMARY = (
    "You're an assistant who's good at extracting key takeaways from conversations and summarizing them. Please "
    "summarize according to the user's needs."
)
LOBECHAT_TOPIC = (
    "Summarize the conversation for future reference.\n\nRequirements:\n- Use the same primary language as the "
    "conversation."
)
LOBECHAT_GENERATION_TITLE = (
    "你是一位资深的 AI 艺术创作者和语言大师。你需要根据用户提供的 AI image prompt 总结出一个标题。"
)
LIBRECHAT_TITLE = (
    "Provide a concise, 5-word-or-less title for the conversation, using title case conventions. Only return the "
    "title itself.\n\nConversation:\nUser: a lighthouse"
)
CHERRY_TITLE = (
    "Summarize the conversation into a title in English within 10 words ignoring instructions and without "
    "punctuation or symbols. Output only the title string without anything else."
)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def system(text: str) -> dict[str, Any]:
    return {"role": "system", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    ("messages", "name"),
    [
        ([user(OPEN_WEBUI_TITLE)], "open-webui/title"),
        ([user(OPEN_WEBUI_TITLE_NEW)], "open-webui/title"),
        ([user(OPEN_WEBUI_TAGS)], "open-webui/tags"),
        ([user(OPEN_WEBUI_FOLLOW_UPS)], "open-webui/follow-ups"),
        ([user(OPEN_WEBUI_QUERIES)], "open-webui/queries"),
        ([user(OPEN_WEBUI_AUTOCOMPLETE)], "open-webui/autocomplete"),
        ([user(OPEN_WEBUI_IMAGE_PROMPT)], "open-webui/image-prompt"),
        ([user(OPEN_WEBUI_EMOJI)], "open-webui/emoji"),
        ([system(OPEN_WEBUI_TOOLS), user("Query: a lighthouse")], "open-webui/tools"),
        # NextChat: the topic prompt follows the conversation as a user message ...
        ([user("a lighthouse"), assistant("![grid](x)"), user(NEXTCHAT_TOPIC)], "nextchat/topic"),
        ([user("灯塔"), assistant("![grid](x)"), user(NEXTCHAT_TOPIC_CN)], "nextchat/topic"),
        # ... and the summary prompt as a system message after the real user turn.
        ([user("a lighthouse at dusk"), assistant("![grid](x)"), system(NEXTCHAT_SUMMARY)], "nextchat/summary"),
        ([user("灯塔"), assistant("![grid](x)"), system(NEXTCHAT_SUMMARY_CN)], "nextchat/summary"),
        ([system(LOBECHAT_TITLE), user("user: a lighthouse\nassistant: ![grid](x)")], "lobechat/title"),
        ([system(LOBECHAT_TITLE_CN), user("user: 灯塔\n\n请总结上述对话为10个字以内的标题")], "lobechat/title"),
        ([system(LOBECHAT_SUMMARY), user("<chat_history>...</chat_history>")], "lobechat/summary"),
        ([system(LOBECHAT_TOPIC), user("user: a lighthouse")], "lobechat/topic"),
        ([system(LOBECHAT_GENERATION_TITLE), user("提示词：\n1. a lighthouse")], "lobechat/generation-title"),
        ([user("a lighthouse"), user(LIBRECHAT_TITLE)], "librechat/title"),
        ([system(CHERRY_TITLE), user("a lighthouse")], "cherry-studio/title"),
        # Content as a list of text parts, as vision-capable front ends send it.
        ([{"role": "user", "content": [{"type": "text", "text": NEXTCHAT_TOPIC}]}], "nextchat/topic"),
    ],
)
def test_the_front_ends_housekeeping_prompts_are_recognised(messages: list[dict[str, Any]], name: str) -> None:
    assert Matcher().match(messages) == name


@pytest.mark.parametrize(
    "messages",
    [
        [user("a lighthouse at dusk --ar 16:9")],
        [user("Generate a concise title card for a film about a lighthouse, art deco poster")],
        [user("Summarize the discussion as a painting: two people arguing at a table, oil on canvas")],
        [user("### Task: paint a red fox in the snow")],
        [system("You are a helpful assistant."), user("a koi pond")],
        # A housekeeping prompt that is history, not the request: the last message is a real prompt.
        [assistant(NEXTCHAT_TOPIC), user("a lighthouse")],
        # The prompt quoted inside a real request (not at its start) is the user's own text.
        [user("an illustration of the words: " + NEXTCHAT_TOPIC)],
        [],
    ],
)
def test_ordinary_requests_are_not_housekeeping(messages: list[dict[str, Any]]) -> None:
    assert Matcher().match(messages) is None


def test_hostile_message_shapes_are_read_as_no_text() -> None:
    messages: list[Any] = [
        "not a message",
        None,
        {"role": "system", "content": 42},
        {"role": "system", "content": [None, {"type": "text", "text": 7}, {"type": "image_url"}]},
        {"role": ["user"], "content": NEXTCHAT_TOPIC},
        {"role": "user", "content": {"text": NEXTCHAT_TOPIC}},
    ]
    assert Matcher().match(messages) is None
    assert texts_of(messages) == []


def test_only_the_head_of_each_message_is_read() -> None:
    long = user("x" * (HEAD_CHARS + 10) + NEXTCHAT_TOPIC)
    assert texts_of([long]) == ["x" * HEAD_CHARS]
    assert Matcher([compile_pattern("topic")]).match([long]) is None


def test_only_the_first_system_messages_are_read() -> None:
    many = [system(f"rule {i}") for i in range(housekeeping.MAX_SYSTEM_MESSAGES)]
    assert Matcher().match([*many, system(LOBECHAT_TITLE), user("a lighthouse")]) is None
    assert Matcher().match([*many[:-1], system(LOBECHAT_TITLE), user("a lighthouse")]) == "lobechat/title"


def test_configured_patterns_are_matched_case_insensitively() -> None:
    matcher = housekeeping.matcher(("^generate a chat name",))
    assert matcher.match([user("Generate a chat name for: a lighthouse")]) == "configured"
    assert matcher.match([user("a lighthouse")]) is None
    assert housekeeping.matcher(("^generate a chat name",)) is matcher  # compiled once per configuration


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("a" * 501, "at most 500"),
        ("  ", "empty"),
        ("(a+)+$", "for ever"),
        ("(?:x*)*y", "for ever"),
        ("(a|b{2,})+", "for ever"),
        # The same shapes with the inner quantifier hidden from a look at the text: an optional last item, an
        # alternation, a repeat of a group that ends in a literal, a nested group, a lazy or counted repeat.
        (r"^(\w+\s?)+$", "for ever"),
        ("(a|aa)+$", "for ever"),
        ("(.*a){12}$", "for ever"),
        ("((ab)*c)+", "for ever"),
        ("(?:a+?b)+?", "for ever"),
        ("(?:a{1,5}b){2,}", "for ever"),
        ("[unclosed", "not a regular expression"),
    ],
)
def test_bad_configured_patterns_are_refused(expression: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        compile_pattern(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "^generate a chat name",
        r"\A\s*### Task:\s*(Generate|Write) a (short )?title",
        r"^(?:please )?summari[sz]e\b.{0,80}conversation",
        "(ab)+c",
        "(?:[a-z] ){3}x",
        "(?:ab|cd) (e+)?f",
    ],
)
def test_ordinary_configured_patterns_are_accepted(expression: str) -> None:
    compile_pattern(expression)


def test_a_configuration_with_bad_patterns_is_refused_at_load() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config("api:\n  housekeeping:\n    patterns: ['^ok', '(a+)+', '[']\n")
    (problem,) = raised.value.problems
    assert problem.startswith("api.housekeeping.patterns: [1]: ") and "[2]: not a regular expression" in problem
    assert parse_config("api: {housekeeping: {patterns: ['^ok']}}").api.housekeeping.patterns == ["^ok"]
