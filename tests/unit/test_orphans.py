from pdserve.worker.orphans import OrphanWatch


def test_untracked_ids_are_due_only_after_the_grace_and_once():
    watch = OrphanWatch(grace_s=5.0)
    assert watch.update({"a", "b"}, {"a"}, now=0.0) == []
    assert watch.update({"a", "b"}, {"a"}, now=4.9) == []
    assert watch.update({"a", "b"}, {"a"}, now=5.0) == ["b"]
    assert watch.aborted == 1
    # Still in the core right after the abort was sent: a new grace, not a second abort at once.
    assert watch.update({"a", "b"}, {"a"}, now=5.1) == []
    assert watch.update({"a"}, {"a"}, now=20.0) == []
    assert watch.aborted == 1


def test_an_id_that_leaves_the_core_or_is_tracked_again_is_forgotten():
    watch = OrphanWatch(grace_s=1.0)
    watch.update({"x", "y"}, set(), now=0.0)
    watch.update({"y"}, set(), now=0.5)  # x finished in the core: forgotten
    watch.update({"x", "y"}, {"y"}, now=0.9)  # y tracked (an abort raced a re-add); x seen anew
    assert watch.update({"x", "y"}, {"y"}, now=1.5) == []
    assert watch.update({"x", "y"}, {"y"}, now=2.0) == ["x"]
