"""Cell-tagged character vocabulary of the bundled tiny model: exact layout, round trips, streaming."""
import random

import pytest

from optictx.errors import TokenizerError
from optictx.grid_tokenizer import ALPHABET, GridGeometry, build_grid_tokenizer, marker, tagged
from optictx.tokenizer import SPECIAL_TOKENS, Tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_grid_tokenizer()


def test_vocabulary_layout(tok):
    # specials (+<unk>), 95 printable characters and "\n", 16 markers, 95 characters x 32 cells
    assert tok.vocab_size == len(SPECIAL_TOKENS) + 1 + 96 + 16 + 95 * 32 == 3173
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.token_id(marker(15)) is not None and tok.token_id(marker(16)) is None
    assert tok.token_id(tagged("@", 31)) is not None and tok.token_id(tagged("a", 32)) is None


def test_geometry_place_and_locate_are_inverse():
    geom = GridGeometry()
    assert geom.place(0, 0) == (0, 0)
    assert geom.place(0, 8) == (1, 0)  # next vision token to the right
    assert geom.place(5, 9) == (5, 9)  # token row 1, column 1; cell row 1, column 1
    for row in range(16):
        for col in range(32):
            assert geom.locate(*geom.place(row, col)) == (row, col)


def test_encode_lines_writes_a_marker_per_vision_token_and_tags_each_character(tok):
    ids, tokens = tok.encode_lines(["abcdefghij", "", "xy"])
    names = [tok.hf.id_to_token(i) for i in ids]
    assert names == [marker(0), "a@0", "b@1", "c@2", "d@3", "e@4", "f@5", "g@6", "h@7",
                     marker(1), "i@0", "j@1", marker(0), "x@16", "y@17"]
    assert tokens == [0] * 9 + [1] * 3 + [0] * 3


def test_decode_round_trips_grid_pages(tok):
    from optictx.data.ocr_pages import OCRPageSource, Level

    source = OCRPageSource(seed=3)
    for i in range(20):
        page = source.page(i, Level(16))
        ids, _ = tok.encode_lines([line for line, _ in page.lines])
        assert tok.decode(ids) == page.text


def test_decode_places_characters_by_tag_not_by_order(tok):
    m0, m1 = tok.token_id(marker(0)), tok.token_id(marker(1))
    ids = [m1, tok.token_id("z@8"), m0, tok.token_id("a@0"), tok.token_id("c@2")]
    # "z" is row 1, column 8; "a" and "c" row 0 with a gap at column 1
    assert tok.decode(ids) == "a c\n        z"


def test_plain_characters_and_specials_for_prompts(tok):
    ids = tok.encode("<image>\nFree OCR.")
    assert ids[0] == tok.image_token_id and len(ids) == 1 + len("\nFree OCR.")
    assert tok.decode(ids) == "<image>\nFree OCR."
    assert tok.decode([tok.bos_id, *tok.encode_lines(["hi"])[0], tok.eos_id], skip_special_tokens=True) == "hi"


def test_outside_the_alphabet_is_a_clear_error(tok):
    with pytest.raises(TokenizerError, match="grid alphabet"):
        tok.encode_lines(["caf\u00e9"])
    assert tok.encode("\u00e9") == [tok.token_id("<unk>")]  # prompts never crash


def test_save_and_load_keep_the_class_and_geometry(tok, tmp_path):
    tok.save(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "GridTokenizer" and loaded.geom == tok.geom
    ids, _ = tok.encode_lines(["The quick brown fox jumps over", "the lazy dog."])
    assert loaded.decode(ids) == "The quick brown fox jumps over\nthe lazy dog."


def test_streaming_deltas_add_up_to_the_text(tok):
    from optictx.generate import IncrementalDecoder

    rng = random.Random(0)
    lines = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 32))).strip() or "x" for _ in range(6)]
    ids, _ = tok.encode_lines(lines)
    dec = IncrementalDecoder(tok)
    streamed = "".join(dec.push(i) for i in ids) + dec.finish()
    assert streamed == dec.text == tok.decode(ids)


def test_a_full_page_fits_page_tokens(tok):
    lines = ["x" * 32] * 16
    ids, _ = tok.encode_lines(lines)
    assert len(ids) == tok.geom.page_tokens == 576
