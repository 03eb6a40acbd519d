"""Prompt-injection heuristics: weighted features, combined as a noisy OR.

The classifier looks for what injections have to say to work, not for known
attack strings:

- ``override``: an instruction-override verb aimed at instructions, rules or the
  system prompt ("disregard the earlier guidelines"), in English, German, French,
  Spanish and Italian; the object has to be instruction-like, so "ignore the typo"
  or "forget my old address" do not count;
- ``persona``: a role or persona hijack ("you are now …", "pretend you have no
  restrictions", DAN, developer mode), where the persona is an unrestricted one;
  "act as a reviewer for my essay" is not;
- ``exfiltration``: requests for the system prompt, hidden instructions, or the
  assistant's keys and credentials, and requests to send conversation data to an
  address or URL;
- ``delimiter``: role tags and chat-template tokens in user text (``</system>``,
  ``<|im_start|>``, ``[INST]``, ``### system``, ``<<SYS>>``), fake end-of-context
  markers;
- ``indirect``: text that addresses the AI reading it ("note to the AI
  assistant", "if you are a language model"), asks to hide actions from the user,
  or smuggles a tool call;
- ``encoded``: base64 and hex runs, ROT13, reversed text and leetspeak are decoded
  (one level) and the decoded text is scored with the same features; an encoded
  payload counts only when what it decodes to would count.

Each feature has a weight (how sure one hit makes us); the score is
``1 - prod(1 - w)`` over the features that fired, so one strong feature or two
weaker ones pass the default threshold of 0.5. The weights and rules were written
from general knowledge of injection attacks before measuring on any corpus; see
docs/guardrails.md for how they do.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
import urllib.parse
from dataclasses import dataclass

__all__ = ["HeuristicInjectionClassifier", "InjectionEvidence"]


@dataclass(frozen=True)
class InjectionEvidence:
    """What the classifier saw: the score, the features that fired and their spans."""

    score: float
    features: tuple[str, ...]
    start: int
    end: int


def _rx(pattern: str) -> re.Pattern[str]:
    # the text is lower-cased once and patterns are written in lower case: matching
    # without re.IGNORECASE is about twice as fast
    return re.compile(pattern, re.MULTILINE)


_INSTRUCTIONS_EN = (
    r"(?:instructions?|prompts?|rules?|directives?|guidelines?|guardrails?|constraints?|"
    r"restrictions?|programming|commands?|orders|polic(?:y|ies)|safety\s+(?:rules|"
    r"guidelines|filters?|protocols?)|filters?|training|system\s+(?:prompt|message)|"
    r"context|directions|configuration|limitations?)"
)
_QUALIFIER_EN = r"(?:previous|prior|above|earlier|preceding|initial|original|old|existing|all|any|every|your|the|these|those|system|developer)"  # noqa: E501

# (name, weight, pattern)
_FEATURES: tuple[tuple[str, float, re.Pattern[str]], ...] = (
    (
        "override.verb_instructions",
        0.75,
        _rx(
            r"\b(?:ignore|disregard|forget|bypass|override|overrule|skip|neglect|abandon|"
            r"discard|drop|dismiss|set\s+aside|throw\s+out|stop\s+following|do\s+not\s+follow|"
            r"don'?t\s+follow|no\s+longer\s+follow)\s+(?:(?:all|any|of|every|each|the|your|my|"
            r"these|those|its)\s+)*"
            + _QUALIFIER_EN
            + r"\b(?:\s+[\w'\u2019-]+){0,3}?\s+"
            + _INSTRUCTIONS_EN
            + r"\b"
        ),
    ),
    (
        "override.everything_above",
        0.7,
        _rx(
            r"\b(?:ignore|disregard|forget)\s+(?:all\s+|everything\s+)?(?:(?:that\s+)?(?:was\s+)?"
            r"(?:said|written|told|stated)\s+)?(?:above|before\s+this|prior\s+to\s+this|"
            r"you\s+(?:were|have\s+been)\s+(?:told|given|instructed))"
        ),
    ),
    (
        "override.new_instructions",
        0.45,
        _rx(
            r"(?:\bnew|\bupdated|\breal|\btrue|\bactual|\bsecret|\bhidden|\boverriding|"
            r"\bpriority|\badmin(?:istrator)?|\bsystem)\s+(?:instructions?|directives?|"
            r"orders|commands?|task)\s*[:\-]"
        ),
    ),
    (
        "override.from_now_on",
        0.35,
        _rx(
            r"\b(?:from\s+now\s+on|from\s+this\s+point\s+(?:forward|on)|henceforth|going\s+"
            r"forward|ab\s+(?:jetzt|sofort)|désormais|à\s+partir\s+de\s+maintenant|a\s+partir\s+"
            r"de\s+ahora|(?:d'|da\s+)ora\s+in\s+poi)\b.{0,40}\b(?:you|your|du|dein\w*|tu|"
            r"vous|t[eu]s?)\b|\binstead\s*,?\s+(?:you\s+(?:must|"
            r"will|should)|(?:only\s+)?(?:reply|respond|answer|say|output|print|write))\b"
        ),
    ),
    # German, French, Spanish, Italian: verb … instruction noun
    (
        "override.multilingual",
        0.75,
        _rx(
            r"\b(?:ignorier\w*|vergiss|vergessen\s+sie|missachte\w*|übergeh\w*|verwirf|"
            r"ignore[rz]?|ignorez|oublie[rz]?|néglige[rz]?|ignora(?:r|d)?|olvida(?:r|d)?|"
            r"omite|descarta|dimentica(?:re)?|trascura|non\s+considerare)"
            r"(?:\s+[\w'\u2019-]+){0,5}?\s+(?:anweisungen|instruktionen|regeln|vorgaben|befehle|"
            r"richtlinien|instructions|consignes|règles|directives|instrucciones|reglas|"
            r"indicaciones|directrices|órdenes|normas|istruzioni|regole|direttive|"
            r"indicazioni)\b"
        ),
    ),
    (
        "persona.you_are_now",
        0.45,
        _rx(
            r"\byou\s+are\s+(?:now|no\s+longer)\b|\bfrom\s+now\s+on\s+you\s+(?:are|will\s+be|"
            r"act)\b|\bdu\s+bist\s+(?:jetzt|nun|ab\s+sofort)\b|\b(?:tu\s+es|vous\s+êtes)\s+"
            r"(?:maintenant|désormais)\b|\bahora\s+eres\b|\bora\s+sei\b|\bd'ora\s+in\s+poi\b"
        ),
    ),
    (
        "persona.unrestricted",
        0.7,
        _rx(
            r"\b(?:act|acting|behave|respond|answer|operate|pretend|roleplay|role-play|play|"
            r"become|be|simulate|emulate|you\s+are|you'?re)\b.{0,60}?\b(?:(?:with(?:out)?|no|"
            r"free\s+(?:of|from)|zero|any)\s+(?:any\s+|all\s+|the\s+|your\s+)?(?:ethical\s+|"
            r"moral\s+|content\s+|safety\s+)?(?:restrictions?|limits|limitations|filters?|"
            r"filtering|censorship|guidelines|rules|boundaries|morals?|ethics|guardrails|"
            r"polic(?:y|ies))|unrestricted|unfiltered|uncensored|unbound|unlimited|jailbroken|"
            r"unaligned|amoral)\b"
        ),
    ),
    (
        "persona.named_mode",
        0.6,
        _rx(
            r"\bdo\s+anything\s+now\b|"
            r"\b(?:jailbreak|jailbroken|god|unrestricted|unfiltered|uncensored|evil|chaos)\s+mode\b|"
            r"\bevil\s+(?:twin|assistant|ai|bot|confidant)\b"
        ),
    ),
    (
        "persona.device_mode",
        0.45,
        _rx(
            r"\b(?:you|you'?re|yourself|assistant|chatgpt|ai|model)\b.{0,30}\b(?:developer|dev|"
            r"sudo|admin|debug|maintenance|root)\s+mode\b(?!\s+(?:on|in|of|for)\s+(?:my|the|"
            r"this|your)\s+(?:phone|device|android|iphone|laptop|computer|router|browser|app|"
            r"car|tv|console))"
        ),
    ),
    (
        "persona.unbound",
        0.5,
        _rx(
            r"\b(?:not|no\s+longer|never)\s+(?:bound|restricted|limited|constrained|governed)\s+"
            r"by\b|\b(?:has|have)\s+(?:been\s+)?(?:freed|liberated|broken\s+free|released)\s+"
            r"from\b|\bdoes\s*n[o']t\s+(?:have\s+to\s+)?(?:follow|obey|abide\s+by)\s+(?:any\s+)?"
            r"(?:rules|policies|guidelines)"
        ),
    ),
    (
        "exfiltration.system_prompt",
        0.7,
        _rx(
            r"\b(?:reveal|show|print|repeat|output|display|tell|disclose|leak|dump|share|give|"
            r"list|recite|copy|paste|write\s+out|spell\s+out|return|echo|expose|provide|send)"
            r"(?:s|ing|ed)?\b(?:\s+[\w'\u2019-]+){0,4}?\s+(?:(?:your|the|its|my)\s+)?(?:(?:full|entire|whole|"
            r"complete|exact|original|initial|hidden|secret|internal|confidential|private|"
            r"underlying|previous)\s+)*(?:system\s*(?:prompt|message|instructions?)|"
            r"(?:initial|original|hidden|secret|internal|developer|pre-?prompt)\s+"
            r"(?:prompt|instructions?|rules|message)|pre-?prompt|meta-?prompt)\b"
        ),
    ),
    (
        "exfiltration.your_secrets",
        0.55,
        _rx(
            r"\b(?:reveal|show|print|repeat|output|display|tell|disclose|leak|dump|share|give|"
            r"list|recite|what\s+(?:are|were|is))\b(?:\s+[\w'\u2019-]+){0,3}?\s+your\s+(?:own\s+)?"
            r"(?:instructions|rules|guidelines|directives|api\s+keys?|credentials|passwords?|"
            r"secrets?|tokens?|configuration|training\s+data)\b"
        ),
    ),
    (
        "exfiltration.text_above",
        0.45,
        _rx(
            r"\b(?:everything|all(?:\s+the)?\s+text|the\s+text|all\s+instructions|words)\s+"
            r"(?:above|before)\b.{0,40}\b(?:verbatim|word\s+for\s+word|exactly|in\s+full)\b|"
            r"\b(?:repeat|print|output|copy)\s+(?:everything|all(?:\s+the\s+text)?)\s+"
            r"(?:above|before|so\s+far)\b|\b(?:starting|beginning)\s+with\s+['\"]?you\s+are\b"
        ),
    ),
    (
        "exfiltration.send_data",
        0.6,
        _rx(
            r"\b(?:send|forward|post|upload|exfiltrate|transmit|email|e-mail|leak|copy|append|"
            r"include|embed|collect|gather|export)\b.{0,60}?\b(?:conversation|chat\s+history|"
            r"history|messages|credentials|api\s+keys?|tokens?|passwords?|secrets?|session|"
            r"cookies?|(?:user|customer|client|personal|patient|employee)s?(?:'s)?\s+(?:data|"
            r"list|emails|records|details|information|database)|environment\s+variables|"
            r"memory|context|database)\b.{0,60}?\b(?:to|into|"
            r"at)\s+(?:https?://|www\.|[\w.+-]+@[\w-]+\.|(?:this|the\s+following|my|an?)\s+"
            r"(?:url|link|address|endpoint|server|webhook|email))"
        ),
    ),
    (
        "exfiltration.markdown_image",
        0.5,
        _rx(r"!\[[^\]]*\]\(https?://[^)\s]+\?[^)\s]*=(?:\{|\[|%7b|<|\$)"),
    ),
    (
        "exfiltration.multilingual",
        0.7,
        _rx(
            r"\b(?:zeig\w*|gib|verrat\w*|nenn\w*|wiederhol\w*|révèle[rz]?|montre[rz]?|"
            r"affiche[rz]?|répète[rz]?|donne[rz]?|revela[rd]?|muestra|muéstrame|dime|repite|"
            r"rivela(?:re)?|mostra(?:mi)?|ripeti|dimmi)\b.{0,40}?\b(?:system[\s-]?prompt\w*|"
            r"systemanweisung\w*|prompt\s+(?:système|du\s+système|del\s+sistema|di\s+sistema)|"
            r"instructions\s+(?:initiales|cachées|système)|instrucciones\s+(?:iniciales|"
            r"ocultas|del\s+sistema)|istruzioni\s+(?:iniziali|nascoste|di\s+sistema)|"
            r"(?:versteckten|ursprünglichen)\s+anweisungen)"
        ),
    ),
    (
        "delimiter.role_tag",
        0.6,
        _rx(
            r"</?\s*(?:system|assistant|sys|instructions?|admin|developer|im_start|im_end|"
            r"context|user_query|tool_result|untrusted)\s*>|<\|(?:im_start|im_end|system|"
            r"assistant|user|endoftext|eot_id|start_header_id|end_header_id)\|>|\[/?inst\]|"
            r"<</?sys>>|\[/?(?:system|admin)\]|\{\{\s*system\s*\}\}|\[(?:system|assistant)\]\(#"
        ),
    ),
    (
        "delimiter.role_header",
        0.45,
        _rx(
            r"^\s*(?:#{2,}|={3,}|-{3,}|\*{3,})\s*(?:new\s+|updated\s+)?(?:system|admin|"
            r"developer|instructions?|assistant)\b|^\s*(?:system|developer)\s*(?:message|"
            r"prompt|override|note)?\s*:\s*\S"
        ),
    ),
    (
        "delimiter.fake_boundary",
        0.4,
        _rx(
            r"\b(?:end|close|stop)\s+of\s+(?:the\s+)?(?:user\s+input|document|context|"
            r"conversation|prompt|instructions|data|email|message)\b\s*[-=*#\])>]{2,}|"
            r"[-=*#\[(<]{2,}\s*(?:end|begin|start)\s+(?:of\s+)?(?:user\s+input|document|"
            r"system|instructions|prompt)"
        ),
    ),
    (
        "indirect.addresses_ai",
        0.55,
        _rx(
            r"\b(?:ai|a\.i\.|assistant|llm|chatbot|chat\s*bot|language\s+model|model|agent|"
            r"bot|gpt|copilot|claude|gemini)s?\s+(?:that\s+is\s+|who\s+is\s+)?(?:reading|"
            r"processing|summari[sz]ing|parsing|analy[sz]ing|reviewing|scanning|browsing)\s+"
            r"(?:this|these|the\s+following)\b|\b(?:note|message|instructions?|attention|"
            r"important|reminder)\s+(?:to|for)\s+(?:the\s+|any\s+|all\s+)?(?:ai|a\.i\.|"
            r"assistant|llm|chatbot|language\s+model|model|agent|bot|gpt)s?\b|\bif\s+you\s+"
            r"are\s+(?:an?\s+)?(?:ai|a\.i\.|assistant|llm|chatbot|language\s+model|large\s+"
            r"language\s+model|bot|agent|automated\s+system)\b|\b(?:dear|hey|hello|hi)\s+"
            r"(?:ai|assistant|llm|chatbot|agent|bot|gpt|claude|copilot)\b\s*[,:!]"
        ),
    ),
    (
        "indirect.hide_from_user",
        0.5,
        _rx(
            r"\b(?:do\s+not|don'?t|never|without)\s+(?:tell(?:ing)?|inform(?:ing)?|mention(?:"
            r"ing)?|notify(?:ing)?|alert(?:ing)?|let(?:ting)?|reveal(?:ing)?\s+(?:this\s+)?to|"
            r"ask(?:ing)?)\s+(?:the\s+)?(?:user|human|customer|operator|them)\b(?!\s+(?:name|"
            r"id|account))"
        ),
    ),
    (
        "indirect.tool_call",
        0.35,
        _rx(
            r"\b(?:call|invoke|use|run|execute|trigger)\s+(?:the\s+)?[\w.-]+\s+(?:tool|"
            r"function|plugin|action|api)\b.{0,80}\b(?:send|delete|transfer|forward|wire|"
            r"pay|export|exfiltrate|grant|disable|remove)\b"
        ),
    ),
    (
        "indirect.while_processing",
        0.3,
        _rx(
            r"\b(?:when|while|after|before)\s+(?:you\s+)?(?:summari[sz]ing|summari[sz]e|"
            r"processing|reading|answering|translating)\b.{0,60}\b(?:you\s+must|always|also|"
            r"instead|make\s+sure\s+to|be\s+sure\s+to)\b"
        ),
    ),
    (
        "override.instructions_void",
        0.7,
        _rx(
            r"\b(?:previous|prior|above|earlier|original|old|initial|all|your|system|existing)\s+"
            r"(?:instructions|rules|guidelines|prompts?|directives|restrictions|constraints|"
            r"policies)\s+(?:are|is|have\s+been|were|has\s+been)\s+(?:now\s+)?(?:void|cancell?ed|"
            r"revoked|obsolete|outdated|superseded|suspended|lifted|removed|disabled|invalid|"
            r"deprecated|null|no\s+longer\s+(?:valid|apply|applicable|in\s+effect|relevant|active))"
        ),
    ),
    (
        "override.supersedes",
        0.55,
        _rx(
            r"\b(?:this|these|the\s+following|my|new)\s+(?:instructions?|messages?|directives?|"
            r"commands?|rules?|prompt)\s+(?:supersedes?|overrides?|takes?\s+precedence|"
            r"replaces?|has\s+priority|have\s+priority)\b"
        ),
    ),
    (
        "override.new_task",
        0.5,
        _rx(
            r"\byour\s+(?:new|real|true|only|actual|updated|primary)\s+(?:task|goal|purpose|job|"
            r"instructions?|objective|role|mission|directive|orders)\s+(?:is|are|will\s+be|:|now)"
        ),
    ),
    (
        "override.authority",
        0.4,
        _rx(
            r"\b(?:system|admin(?:istrator)?|developer|security|root|emergency|maintenance)\s+"
            r"(?:override|update|alert|notice|mode|command|message|instruction|access)\b\s*[:!\-]|"
            r"\b(?:i\s+am|this\s+is)\s+(?:your|the|an?)\s+(?:developer|creator|administrator|"
            r"admin|owner|operator|system\s+administrator)\b|\bauthori[sz]ation\s+(?:code|"
            r"level)\b"
        ),
    ),
    (
        "override.disable_safety",
        0.7,
        _rx(
            r"\b(?:disable|turn\s+off|switch\s+off|deactivate|remove|bypass|circumvent|evade|"
            r"lift|suspend|ignore)\s+(?:all\s+|any\s+|your\s+|the\s+|its\s+)*(?:safety|"
            r"content|ethical|moral|security)?\s*(?:filters?|filtering|guardrails?|safeguards?|"
            r"restrictions?|alignment|censorship|moderation|safety\s+(?:checks?|measures?|"
            r"protocols?|features?))\b"
        ),
    ),
    (
        "override.multilingual_new",
        0.45,
        _rx(
            r"\b(?:neue|nouvelles?|nuevas?|nuove|nuova)\s+(?:anweisungen?|instructions?|consignes?|"
            r"instrucciones|istruzioni|regeln|règles|reglas|regole)\s*:"
        ),
    ),
    (
        "persona.pretend",
        0.3,
        _rx(
            r"\bpretend\s+(?:that\s+)?you\s+(?:are|have|can|were|don'?t)\b|\bstay\s+in\s+"
            r"character\b|\b(?:imagine|suppose)\s+you\s+(?:are|were|had)\s+(?:an?\s+)?(?:ai|"
            r"assistant|model|chatbot)\b|\bcan\s+do\s+anything\b"
        ),
    ),
    (
        "persona.never_refuse",
        0.45,
        _rx(
            r"\b(?:never|don'?t|do\s+not|cannot|can'?t|won'?t|will\s+not|must\s+not)\s+"
            r"(?:ever\s+)?(?:refuse|decline|say\s+no|reject\s+(?:a|any)\s+request|"
            r"add\s+(?:any\s+)?(?:warnings|disclaimers))\b|\bwithout\s+(?:any\s+)?"
            r"(?:warnings|disclaimers|refusals?|moral(?:izing)?|lecturing)\b"
        ),
    ),
    (
        "persona.dual_answer",
        0.45,
        _rx(
            r"\b(?:two|both|dual)\s+(?:responses|answers|replies)\b.{0,80}\b(?:jailbroken|"
            r"unfiltered|unrestricted|uncensored|dan|evil|developer\s+mode)\b|\b(?:opposite|"
            r"anti|evil|shadow|dark)[\s-]?(?:gpt|ai|assistant|mode|version\s+of\s+you)\b"
        ),
    ),
    (
        "persona.multilingual",
        0.5,
        _rx(
            r"\b(?:ohne|sans|sin|senza|keine)\s+(?:jegliche|jede|irgendwelche|aucune?|ninguna?|"
            r"alcuna?|alcun)?\s*(?:einschr(?:ä|ae)nkungen|regeln|filter|grenzen|zensur|restrictions?|"
            r"limites?|règles|filtres?|censure|restricci(?:ón|ones)|límites|reglas|filtros|"
            r"censura|restrizion[ei]|limiti|regole|filtri)\b"
        ),
    ),
    (
        "exfiltration.what_is_prompt",
        0.65,
        _rx(
            r"\b(?:what|which)\s+(?:is|are|was|were)\s+(?:your|the)\s+(?:(?:full|exact|"
            r"original|initial|hidden|secret|internal)\s+)*(?:system\s*(?:prompt|message|"
            r"instructions?)|initial\s+(?:prompt|instructions)|pre-?prompt)\b|\b(?:summari[sz]e|"
            r"translate|paraphrase|encode|rewrite)\s+(?:your|the)\s+(?:system\s*(?:prompt|"
            r"message)|(?:initial|original|hidden|secret)\s+instructions)\b|\bwhat\s+(?:were|"
            r"have)\s+you\s+(?:been\s+)?(?:told|instructed|programmed)\s+(?:to\s+do\s+)?"
            r"(?:before|by|at\s+the\s+start|initially)|\b(?:beginning|start)\s+of\s+(?:this|the"
            r"|our)\s+(?:conversation|prompt|chat|context)\b"
        ),
    ),
    (
        "exfiltration.environment",
        0.55,
        _rx(
            r"\b(?:print|show|list|dump|output|reveal|read|cat|display|give\s+me)\b.{0,30}"
            r"(?:environment\s+variables|env\s+vars|\.env\b|os\.environ|/etc/(?:passwd|shadow)|"
            r"~/\.ssh|id_rsa|\.aws/credentials|(?:api|secret|access)\s+keys?\s+(?:you|that\s+you)"
            r"\s+(?:have|use|were\s+given|know))"
        ),
    ),
    (
        "delimiter.role_json",
        0.55,
        _rx(
            r"[\"']role[\"']\s*:\s*[\"'](?:system|developer|assistant)[\"']|^\s*(?:human|"
            r"assistant|user|ai|bot)\s*:\s*\S(?=.*\n\s*(?:human|assistant|user|ai|bot)\s*:)"
        ),
    ),
    (
        "indirect.command_to_ai",
        0.55,
        _rx(
            r"\b(?:ai|assistant|agent|model|llm|chatbot|bot|gpt|claude|copilot)\s*[:,]\s*"
            r"(?:please\s+)?(?:ignore|disregard|send|forward|delete|reveal|print|output|say|"
            r"respond|reply|include|append|add|tell|transfer|call|execute|run|visit|open|click|"
            r"email|recommend|insert|write|state|inform|do\s+not|don'?t|you\s+must|always|"
            r"never)\b"
        ),
    ),
    (
        "indirect.tell_the_user",
        0.4,
        _rx(
            r"\b(?:tell|inform|convince|persuade|instruct|advise|urge|direct|ask)\s+(?:the|"
            r"all|any)\s+(?:users?|readers?|customers?|humans?|visitors?)\s+(?:that|to)\b|"
            r"\b(?:in\s+your|at\s+the\s+end\s+of\s+your|to\s+your)\s+(?:response|answer|"
            r"reply|summary|output)s?\s*,?\s+(?:you\s+must\s+|always\s+|please\s+)?"
            r"(?:include|add|append|insert|mention|recommend|say|state|claim)\b"
        ),
    ),
    (
        "indirect.send_externally",
        0.3,
        _rx(
            r"\b(?:send|forward|email|e-mail|transfer|wire|post|upload|submit|leak|call|push|"
            r"sync|log)\b.{0,80}?"
            r"\b(?:to|at)\s+(?:https?://\S+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+)"
        ),
    ),
    (
        "indirect.hidden_markup",
        0.35,
        _rx(
            r"<!--[^>]{0,300}?\b(?:ai|assistant|llm|model|agent|ignore|instruction|must|system)"
            r"\b|display\s*:\s*none|font-size\s*:\s*0|color\s*:\s*(?:white|#fff\b|#ffffff)|"
            r"visibility\s*:\s*hidden"
        ),
    ),
    (
        "indirect.tool_identifier",
        0.45,
        _rx(
            r"\b(?:call|invoke|use|run|execute|trigger|fire)\s+(?:the\s+)?`?[a-z][a-z0-9]*_"
            r"[a-z0-9_]+`?(?:\(\))?\s+(?:on|to|with|for|and|tool|function|in\s+order)\b"
        ),
    ),
    (
        "indirect.before_responding",
        0.3,
        _rx(
            r"\bbefore\s+(?:you\s+)?(?:respond|reply|answer|continu|proceed)(?:ing|s)?\b|"
            r"\b(?:first|then)\s+(?:empty|delete|wipe|erase|remove|drop|purge)\s+(?:the|all|"
            r"every)\b"
        ),
    ),
    (
        "indirect.every_response",
        0.45,
        _rx(
            r"\b(?:to|at|in)\s+(?:the\s+(?:end|start|beginning)\s+of\s+)?(?:every|each|any|all)\s+"
            r"(?:future\s+)?(?:responses?|answers?|repl(?:y|ies)|messages?|outputs?|sessions?)\b|"
            r"\b(?:am\s+ende|am\s+anfang)\s+jeder\s+antwort|\b(?:à\s+la\s+fin|au\s+début)\s+"
            r"d[e']\s*(?:toute|chaque)\s+réponse|\balla\s+fine\s+di\s+ogni\s+risposta|"
            r"\bal\s+final\s+de\s+(?:cada|toda)\s+respuesta"
        ),
    ),
    (
        "indirect.memory_write",
        0.45,
        _rx(
            r"\b(?:save|store|remember|persist|write|add|keep)\s+(?:this|the\s+following|these)"
            r"(?:\s+(?:note|instructions?|rule|message|text))?\s+(?:to|in|into)\s+(?:your\s+)?"
            r"(?:long[\s-]term\s+)?(?:memory|memories|notes|profile)\b|\bnote\s+to\s+self\b"
        ),
    ),
    (
        "indirect.agents_should",
        0.5,
        _rx(
            r"\b(?:ai|llm|automated|autonomous|coding)\s+(?:agents?|assistants?|models?|tools?|"
            r"systems?)\b(?:\s+[\w'-]+){0,4}\s+(?:should|must|need\s+to|are\s+required\s+to|"
            r"are\s+instructed\s+to|will)\b"
        ),
    ),
    (
        "override.authority_note",
        0.4,
        _rx(
            r"^\s*(?:system|admin|developer|processing|security)?\s*(?:override|note|notice|"
            r"hinweis|systemhinweis|remarque)\s*(?:\([^)]*\))?\s*:|\bnote\s+(?:système|"
            r"du\s+système)\b|\bnota\s+(?:di|del)\s+sistema\b|\bsystemhinweis\b"
        ),
    ),
    (
        "override.safety_disabled",
        0.7,
        _rx(
            r"\b(?:safety|content|security|ethical)\s+(?:protocols?|filters?|restrictions|"
            r"guidelines|guardrails|checks|measures|policies|rules)\s+(?:are\s+|have\s+been\s+|"
            r"were\s+|is\s+)?(?:now\s+)?(?:disabled|off|removed|lifted|suspended|deactivated|"
            r"bypassed|waived)\b|\b(?:granted|given|gave)\s+(?:you\s+)?(?:full\s+)?(?:permission|"
            r"authori[sz]ation|consent|clearance)\s+to\s+(?:skip|bypass|ignore|disable|override|"
            r"turn\s+off)\b|\bskip\s+(?:all\s+|any\s+|the\s+)?(?:safety\s+checks|"
            r"confirmations|verification|content\s+checks)\b"
        ),
    ),
    (
        "persona.exempt",
        0.55,
        _rx(
            r"\b(?:exempt\s+from|not\s+subject\s+to|outside\s+the\s+scope\s+of)\s+(?:the\s+|"
            r"your\s+|any\s+|all\s+)?(?:usual\s+|normal\s+|standard\s+)?(?:restrictions|rules|"
            r"guidelines|polic(?:y|ies)|safety|filters|content\s+policy)\b|\b(?:restrictions|"
            r"rules|guidelines|policies|safeguards)\s+(?:do\s+not|don'?t|no\s+longer|doesn'?t)\s+"
            r"apply\b|\b(?:sicherheitsrichtlinien|richtlinien|regeln|einschr(?:ä|ae)nkungen)\b"
            r".{0,30}\bnicht\s+(?:mehr\s+)?gelten|\bne\s+s'appliquent\s+(?:pas|plus)\b|\bno\s+"
            r"se\s+aplican\b|\bnon\s+si\s+applicano\b|\bunrestricted\s+(?:response|mode|"
            r"answer|output|version)\b"
        ),
    ),
    (
        "persona.no_rules",
        0.6,
        _rx(
            r"\byou\s+(?:now\s+)?(?:have|possess|got)\s+no\s+(?:rules|restrictions|limits|"
            r"filters|guidelines|boundaries|ethics|morals)\b|\b(?:hast\s+du|du\s+hast)\s+keine\s+"
            r"(?:regeln|grenzen|einschr(?:ä|ae)nkungen)\b|\btu\s+n'as\s+(?:plus\s+)?(?:aucune|de)\s+"
            r"(?:règle|restriction|limite)|\bno\s+tienes\s+(?:ninguna\s+)?(?:reglas|"
            r"restricciones|límites)\b|\bnon\s+hai\s+(?:più\s+)?(?:nessuna\s+)?(?:regole|"
            r"restrizioni|limiti)\b|\bcomply\s+with\s+(?:every|any|all)\s+requests?\b"
        ),
    ),
    (
        "exfiltration.external_target",
        0.35,
        _rx(
            r"\b(?:to|an|à|a|an\s+die|all')\s+(?:an?\s+|l'|la\s+|une?\s+|die\s+|eine\s+)?"
            r"(?:external|outside|third[\s-]party|externe|externen?|externa|esterno|esterna)\s+"
            r"(?:address|adresse|dirección|indirizzo|server|url|email|e-mail|mailbox|endpoint|"
            r"account|contact)|\b(?:adresse|dirección|indirizzo)\s+(?:externe|externa|esterno)\b"
        ),
    ),
    (
        "exfiltration.multilingual_send",
        0.45,
        _rx(
            r"\b(?:envoie|envoyez|envoyer|transf[eé]rer?|sende|schicke?|senden|übermittle|"
            r"env[ií]a|enviar|reenv[ií]a|invia|inviare|inoltra)\w*\b.{0,80}?(?:[\w.+-]+@[\w-]+"
            r"(?:\.[\w-]+)+|https?://)"
        ),
    ),
    (
        "override.the_above",
        0.45,
        _rx(
            r"\b(?:ignore|disregard|forget)\s+(?:all\s+)?(?:of\s+)?(?:the|that|what(?:ever)?|"
            r"anything)\s+(?:was\s+)?(?:above|previous(?:ly)?|prior|earlier|preceding|said\s+"
            r"before)\b|\b(?:ignore|disregard)\s+(?:the\s+)?(?:user|customer|human)(?:'?s)?\s+"
            r"(?:request|question|query|instructions|message|input)\b"
        ),
    ),
    (
        "override.everything_multilingual",
        0.55,
        _rx(
            r"\b(?:vergiss|ignoriere|vergessen\s+sie)\s+alles\b|\b(?:oublie[zr]?|ignore[zr]?)\s+"
            r"tout\s+(?:ce\s+qu|ce\s+que|ce\s+qui)|\b(?:olvida|ignora)\s+todo\s+lo\b|"
            r"\b(?:dimentica|ignora)\s+tutto\s+(?:quello|ciò|quanto)\b"
        ),
    ),
    (
        "persona.character_without_limits",
        0.5,
        _rx(
            r"\b(?:who|that|which)\s+(?:has\s+no|doesn'?t\s+have\s+any|does\s+not\s+have\s+any|"
            r"never\s+follows|doesn'?t\s+follow|does\s+not\s+follow|ignores|isn'?t\s+bound\s+by|"
            r"doesn'?t\s+care\s+about)\s+(?:any\s+)?(?:rules|restrictions|filters|morals|ethics|"
            r"guidelines|limits|policies|laws)\b|\b(?:character|persona|ai|assistant|model)\s+"
            r"(?:who|that)\s+(?:can|will|would)\s+(?:say|do|answer)\s+anything\b"
        ),
    ),
    (
        "exfiltration.what_is_secret",
        0.45,
        _rx(
            r"\bwhat(?:'s|\s+is|\s+was)\s+(?:the|your)\s+(?:secret|password|passphrase|passcode|"
            r"api\s+key|access\s+code|secret\s+key|admin\s+password)\s*(?:\?|$|\.)"
        ),
    ),
    (
        "exfiltration.other_users",
        0.5,
        _rx(
            r"\b(?:other|previous|earlier|all)\s+users'?\s+(?:messages|conversations|chats|data|"
            r"questions|queries|sessions|prompts)\b|\b(?:print|show|dump|list|output|reveal)\s+"
            r"(?:the\s+|all\s+|your\s+)*(?:conversation|chat)\s+(?:history|log)s?\b"
        ),
    ),
    (
        "indirect.assistant_should",
        0.45,
        _rx(
            r"\b(?:the|any|an?|all)\s+(?:ai|assistant|chatbot|model|agent|llm|bot)s?\s+(?:should|"
            r"must|needs?\s+to|is\s+required\s+to|is\s+instructed\s+to|will\s+now)\b|\bwhen\s+"
            r"(?:an?\s+|the\s+)?(?:ai|assistant|llm|agent|model|chatbot|bot)\s+(?:reads|processes|"
            r"summari[sz]es|sees|encounters|parses|retrieves)\s+(?:this|these)\b"
        ),
    ),
    (
        "encoded.decode_and_obey",
        0.55,
        _rx(
            r"\b(?:decode|decipher|decrypt|translate|reverse|unscramble|convert)\b.{0,60}\b(?:and|"
            r"then)\s+(?:follow|execute|obey|run|do|carry\s+out|act\s+on|comply\s+with|"
            r"perform|apply)\b(?!\s+(?:it\s+)?(?:for\s+me\s+)?(?:in|with)\s+(?:python|code))"
        ),
    ),
)

# features that need the text's own case (matched on it, not on the lower-cased text)
_CASED_FEATURES: tuple[tuple[str, float, re.Pattern[str]], ...] = (
    (
        "persona.dan",
        0.6,
        re.compile(
            r"(?i:\b(?:as|be|become|are|called|named|play(?:ing)?|you'?re|now|hi|hello))\s+DAN\b|"
            r"\bDAN\s+(?i:mode|prompt|jailbreak|persona)\b"
        ),
    ),
)

_NORMALISE = str.maketrans(
    {
        "\u200b": "", "\u200c": "", "\u200d": "", "\u2060": "", "\ufeff": "", "\u00ad": "",
        # Cyrillic and Greek look-alikes of Latin letters
        "\u0430": "a", "\u0435": "e", "\u043e": "o", "\u0440": "p", "\u0441": "c",
        "\u0443": "y", "\u0445": "x", "\u0456": "i",
        "\u03bf": "o", "\u03b1": "a", "\u03b5": "e", "\u03b9": "i",
    }
)  # fmt: skip
_LEET = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"}
)
_SPACED = re.compile(r"\b(?:[A-Za-z][ .\-_*]){3,}[A-Za-z]\b")  # "i g n o r e"
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{16,}={0,2}(?![A-Za-z0-9+/=_-])")
_HEX = re.compile(r"\b(?:[0-9a-fA-F]{2}[ :]?){12,}\b")
_LEET_HINT = re.compile(r"[a-z][0-9@$!][a-z]|[0-9@$][a-z]{2}", re.IGNORECASE)
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|x([0-9a-fA-F]{2}))")
_BINARY = re.compile(r"\b(?:[01]{8}\s?){6,}")
_MORSE = re.compile(r"(?:[.\-]{1,7}[ /]+){8,}[.\-]{1,7}")
_MORSE_CODE = {
    ".-": "a", "-...": "b", "-.-.": "c", "-..": "d", ".": "e", "..-.": "f", "--.": "g",
    "....": "h", "..": "i", ".---": "j", "-.-": "k", ".-..": "l", "--": "m", "-.": "n",
    "---": "o", ".--.": "p", "--.-": "q", ".-.": "r", "...": "s", "-": "t", "..-": "u",
    "...-": "v", ".--": "w", "-..-": "x", "-.--": "y", "--..": "z", "-----": "0",
    ".----": "1", "..---": "2", "...--": "3", "....-": "4", ".....": "5", "-....": "6",
    "--...": "7", "---..": "8", "----.": "9",
}  # fmt: skip
# words at least one feature needs; decoded variants without any are not scored
_TRIGGER = re.compile(
    r"ignor|disregard|forget|instruc|system|prompt|rule|reveal|pretend|bypass|overrid|"
    r"restrict|previous|jailbr|\bdan\b|developer|assistant|\bai\b|send|mail|call|polic|"
    r"filter|safety|secret|password|credential|key|token|role|persona|act\b|behave|you|"
    r"decode|execute|tool|\buser|respon|answer|repl",
    re.IGNORECASE,
)
# a long text is scored in windows of this many characters (overlapping by _OVERLAP),
# and its score is the best window's: padding cannot push an injection out of sight
_WINDOW = 8_000
_OVERLAP = 400


def _decode_base64(blob: str) -> str | None:
    try:
        raw = base64.b64decode(blob + "=" * (-len(blob) % 4), altchars=b"-_", validate=False)
    except (binascii.Error, ValueError):
        return None
    return _printable(raw)


def _decode_hex(blob: str) -> str | None:
    try:
        raw = bytes.fromhex(re.sub(r"[ :]", "", blob))
    except ValueError:
        return None
    return _printable(raw)


def _decode_morse(code: str) -> str:
    words = re.split(r"\s*/\s*|\s{3,}", code.strip())
    return " ".join("".join(_MORSE_CODE.get(sym, "") for sym in w.split()) for w in words)


def _decode_binary(bits: str) -> str:
    raw = bytes(int(b, 2) for b in re.findall(r"[01]{8}", bits))
    return _printable(raw) or ""


def _untag(ch: str) -> str:
    """Unicode tag characters (U+E0020..E007E) smuggle invisible ASCII."""
    return chr(ord(ch) - 0xE0000) if "\U000e0020" <= ch <= "\U000e007e" else ch


def _printable(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    return text if text and letters / len(text) > 0.85 else None


class HeuristicInjectionClassifier:
    """Scores text 0..1 for prompt injection with weighted, general heuristics."""

    def __init__(
        self,
        features: tuple[tuple[str, float, re.Pattern[str]], ...] = _FEATURES,
        cased_features: tuple[tuple[str, float, re.Pattern[str]], ...] = _CASED_FEATURES,
    ) -> None:
        self._features = features  # patterns in lower case, matched on the lower-cased text
        self._cased = cased_features

    def score(self, text: str) -> float:
        return self.evidence(text).score

    def evidence(self, text: str) -> InjectionEvidence:
        """The score with the features that fired and the span that holds them."""
        if len(text) <= _WINDOW:
            return self._evidence(text)
        best = InjectionEvidence(0.0, (), 0, 0)
        for offset in range(0, len(text) - _OVERLAP, _WINDOW - _OVERLAP):
            found = self._evidence(text[offset : offset + _WINDOW])
            if found.score > best.score:
                best = InjectionEvidence(
                    found.score, found.features, offset + found.start, offset + found.end
                )
        return best

    def _evidence(self, text: str) -> InjectionEvidence:
        hits: dict[str, float] = {}
        spans: list[tuple[int, int]] = []
        plain = unicodedata.normalize("NFKC", text).translate(_NORMALISE)
        same_offsets = len(plain) == len(text)
        self._match(plain, hits, spans if same_offsets else None, "")
        if not same_offsets:
            spans.append((0, len(text)))
        for name, variant in self._variants(plain):
            if not _TRIGGER.search(variant):
                continue  # no word any feature starts from: skip the full pass
            found: dict[str, float] = {}
            self._match(variant, found, None, name)
            # what the plain text already showed is not counted twice
            new = {k: w for k, w in found.items() if k.removeprefix(name) not in hits}
            if new:
                hits.update(new)
                spans.append((0, len(text)))
        for m in _BASE64.finditer(plain):
            self._encoded(_decode_base64(m.group()), "base64", hits, spans, m.span())
        for m in _HEX.finditer(plain):
            self._encoded(_decode_hex(m.group()), "hex", hits, spans, m.span())
        score = 1.0
        for weight in hits.values():
            score *= 1.0 - weight
        start = min((s for s, _ in spans), default=0)
        end = max((e for _, e in spans), default=0)
        return InjectionEvidence(round(1.0 - score, 4), tuple(sorted(hits)), start, end)

    def _match(
        self,
        text: str,
        hits: dict[str, float],
        spans: list[tuple[int, int]] | None,
        prefix: str,
    ) -> None:
        low = text.lower()
        if spans is not None and len(low) != len(text):
            spans.append((0, len(text)))  # lower() moved offsets: the whole text
            spans = None
        for features, subject in ((self._features, low), (self._cased, text)):
            for name, weight, pattern in features:
                key = f"{prefix}{name}"
                if hits.get(key, 0.0) >= weight:
                    continue
                m = pattern.search(subject)
                if m is None:
                    continue
                hits[key] = weight
                if spans is not None:
                    spans.append(m.span())

    def _variants(self, text: str) -> list[tuple[str, str]]:
        """Obfuscated spellings of the text, undone: leetspeak, spacing, ROT13, reversal."""
        out: list[tuple[str, str]] = []
        if _LEET_HINT.search(text):
            out.append(("leetspeak:", text.translate(_LEET)))
        if _SPACED.search(text):
            out.append(("spaced:", _SPACED.sub(lambda m: re.sub(r"[ .\-_*]", "", m.group()), text)))
        if len(_PERCENT.findall(text)) >= 3:
            out.append(("percent:", urllib.parse.unquote(text)))
        if len(_ESCAPE.findall(text)) >= 3:
            out.append(
                ("escapes:", _ESCAPE.sub(lambda m: chr(int(m.group(1) or m.group(2), 16)), text))
            )
        if any("\U000e0000" <= ch <= "\U000e007f" for ch in text):
            out.append(("unicode_tags:", "".join(_untag(ch) for ch in text)))
        binary = [_decode_binary(m.group()) for m in _BINARY.finditer(text)]
        if any(binary):
            out.append(("binary:", " ".join(b for b in binary if b)))
        morse = [_decode_morse(m.group()) for m in _MORSE.finditer(text)]
        if morse:
            out.append(("morse:", " ".join(morse)))
        out.append(("rot13:", codecs.encode(text, "rot13")))
        out.append(("reversed:", text[::-1]))
        return out

    def _encoded(
        self,
        decoded: str | None,
        how: str,
        hits: dict[str, float],
        spans: list[tuple[int, int]],
        span: tuple[int, int],
    ) -> None:
        if not decoded:
            return
        inner: dict[str, float] = {}
        if _TRIGGER.search(decoded):
            self._match(decoded, inner, None, "")
        if inner:
            weight = 1.0
            for w in inner.values():
                weight *= 1.0 - w
            hits[f"{how}:" + "+".join(sorted(inner))] = 1.0 - weight
            spans.append(span)
