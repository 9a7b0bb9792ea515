from kvchat.kv.scope import fingerprint, scope_key


def test_scope_key_is_stable_and_depends_on_model_and_salt():
    model = fingerprint(["weights-a", "float32", "template"])
    key = scope_key(model, "tenant-a")
    assert key == scope_key(model, "tenant-a") and key.startswith("scope:")
    assert key != scope_key(model, "tenant-b")
    assert key != scope_key(model)
    assert key != scope_key(fingerprint(["weights-a", "bfloat16", "template"]), "tenant-a")


def test_fingerprint_parts_are_separated():
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])
