from kvchat.prefix import common_prefix_len, fingerprint, prefix_key


def test_key_is_stable_and_depends_on_every_input():
    model = fingerprint(["weights-a", "float32", "template"])
    key = prefix_key(model, [1, 2, 3])
    assert key == prefix_key(model, [1, 2, 3])
    assert key.startswith("prefix:")
    assert key != prefix_key(model, [1, 2, 4])
    assert key != prefix_key(model, [1, 2])
    assert key != prefix_key(model, [1, 2, 3], salt="tenant-b")
    assert key != prefix_key(fingerprint(["weights-a", "bfloat16", "template"]), [1, 2, 3])


def test_fingerprint_parts_are_separated():
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])


def test_large_token_ids_do_not_wrap():
    model = fingerprint(["m"])
    assert prefix_key(model, [2**40]) != prefix_key(model, [0])


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([5], [6]) == 0
