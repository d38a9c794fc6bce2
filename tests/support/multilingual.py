# ruff: noqa: RUF001 (the texts are meant to hold non-Latin look-alike characters)
"""A generated multilingual prompt set (CJK, other scripts, code, emoji, numbers) for token-count checks.

Deterministic: the same seed gives the same texts. Each text joins 1-6 sentences of one kind, so lengths
vary from a few words to a paragraph, the way support tickets and documents do.
"""

from __future__ import annotations

import random

SENTENCES: dict[str, tuple[str, ...]] = {
    "english": (
        "The invoice total does not match the order confirmation I received last Tuesday.",
        "Could you check whether the discount code was applied twice?",
        "My package was marked as delivered, but nothing arrived at the front door.",
        "After the latest update the app crashes as soon as I open the settings page.",
        "Please cancel the annual plan and refund the unused months to my card.",
        "I have been waiting for a reply for three days now, which is frustrating.",
    ),
    "german": (
        "Die Rechnung stimmt nicht mit der Bestellbestätigung überein.",
        "Bitte prüfen Sie, ob der Rabattcode zweimal angewendet wurde.",
        "Mein Paket wurde als zugestellt markiert, ist aber nie angekommen.",
        "Seit dem letzten Update stürzt die App beim Öffnen der Einstellungen ab.",
    ),
    "russian": (
        "Сумма в счёте не совпадает с подтверждением заказа.",
        "Проверьте, пожалуйста, не был ли промокод применён дважды.",
        "Посылка отмечена как доставленная, но я её не получил.",
        "После обновления приложение закрывается при открытии настроек.",
    ),
    "chinese": (
        "发票金额与订单确认不一致。",
        "请检查折扣码是否被重复使用。",
        "包裹显示已送达，但我没有收到任何东西。",
        "更新之后，打开设置页面时应用程序会崩溃。",
        "请取消年度套餐，并把未使用的月份退款到我的卡上。",
    ),
    "japanese": (
        "請求書の金額が注文確認と一致しません。",
        "割引コードが二重に適用されていないか確認してください。",
        "荷物は配達済みになっていますが、届いていません。",
        "最新のアップデート後、設定画面を開くとアプリが落ちます。",
    ),
    "korean": (
        "청구서 금액이 주문 확인서와 일치하지 않습니다.",
        "할인 코드가 두 번 적용되었는지 확인해 주세요.",
        "배송 완료로 표시되었지만 물건을 받지 못했습니다.",
        "업데이트 후 설정 화면을 열면 앱이 종료됩니다.",
    ),
    "arabic": (
        "إجمالي الفاتورة لا يطابق تأكيد الطلب.",
        "يرجى التحقق مما إذا كان رمز الخصم قد طُبّق مرتين.",
        "تم وضع علامة على الطرد بأنه تم تسليمه، لكنه لم يصل.",
    ),
    "hindi": (
        "चालान की कुल राशि ऑर्डर की पुष्टि से मेल नहीं खाती।",
        "कृपया जाँचें कि क्या छूट कोड दो बार लगाया गया था।",
        "पैकेज को डिलीवर बताया गया है, लेकिन मुझे कुछ नहीं मिला।",
    ),
    "code": (
        "def merge(a: list[int], b: list[int]) -> list[int]:\n    return sorted(a + b)\n",
        "SELECT customer_id, SUM(amount) FROM invoices WHERE NOT paid GROUP BY 1 HAVING SUM(amount) > 100;",
        "const total = items.reduce((sum, item) => sum + item.price * item.qty, 0);\n",
        '{"order_id": 48213, "items": [{"sku": "A-1029", "qty": 2, "price": 19.99}], "coupon": "SPRING24"}',
        "for i in range(10):\n    if i % 3 == 0:\n        print(f'{i:>4}')\n",
    ),
    "emoji": (
        "Great service!!! 🎉🎉 Loved it 😍👍🏽",
        "shipping 🚚 took 5 days 😤 but the shoes 👟 fit perfectly ✨",
        "10/10 would buy again 🛒💯🔥",
        "family trip 👨‍👩‍👧‍👦 to the beach 🏖️🌊☀️",
    ),
    "numbers": (
        "Order 48213-77 shipped 2026-11-30T23:59:59Z to 192.168.1.10, total 1,234.56 EUR.",
        "Serials: 0x7fffffff 3141592653 2718281828 1618033988.",
        "Tracking 1Z999AA10123456784, phone +49 30 1234 5678.",
    ),
}


def multilingual_texts(per_kind: int = 100, seed: int = 19) -> list[tuple[str, str]]:
    """``(kind, text)`` pairs, ``per_kind`` texts of each kind in :data:`SENTENCES`.

    :param per_kind: texts per kind.
    :param seed: the random seed.
    """
    rng = random.Random(seed)
    texts = []
    for kind, sentences in SENTENCES.items():
        joiner = "" if kind in ("chinese", "japanese") else " "
        for _ in range(per_kind):
            texts.append((kind, joiner.join(rng.choices(sentences, k=rng.randint(1, 6)))))
    return texts
