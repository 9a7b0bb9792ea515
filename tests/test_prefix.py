from kvchat.prefix import common_prefix_len, fingerprint, scope_key


def test_scope_key_is_stable_and_depends_on_model_and_salt():
    model = fingerprint(["weights-a", "float32", "template"])
    key = scope_key(model, "tenant-a")
    assert key == scope_key(model, "tenant-a") and key.startswith("scope:")
    assert key != scope_key(model, "tenant-b")
    assert key != scope_key(model)
    assert key != scope_key(fingerprint(["weights-a", "bfloat16", "template"]), "tenant-a")


def test_fingerprint_parts_are_separated():
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([5], [6]) == 0
