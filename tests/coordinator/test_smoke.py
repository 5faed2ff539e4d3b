from coldswarm.proto import coldswarm_pb2 as pb

from .conftest import delta_contribution


def test_fusion_round_end_to_end(harness, tiny_model):
    st = harness.admin.Status(pb.StatusRequest(), metadata=harness.amd)
    assert st.current_version == 0
    rnd = harness.open_fusion(quorum=2)
    w1, w2 = harness.register(name="a"), harness.register(name="b")
    a1 = w1.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w1.md)
    a2 = w2.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w2.md)
    assert a1.fusion.shard == "default:0-of-2" and a2.fusion.shard == "default:1-of-2"
    w1.upload(delta_contribution(tiny_model, seed=1), rnd.id, assignment_id=a1.id)
    w2.upload(delta_contribution(tiny_model, seed=2), rnd.id, assignment_id=a2.id)
    harness.app.merges.wait_idle(60)
    r = harness.admin.ListRounds(pb.ListRoundsRequest(), metadata=harness.amd).rounds[-1]
    assert r.state == "published", r.error
    assert r.result_version == 1
    v = harness.admin.GetVersion(pb.GetVersionRequest(version="latest"), metadata=harness.amd)
    assert v.number == 1 and v.parent == 0 and v.is_current
