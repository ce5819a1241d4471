"""Checkpoint loading never unpickles arbitrary code."""


import pytest
import torch

from megamobi.checkpointing.safe_deepspeed import SafeTorchCheckpointEngine

EVIDENCE = "/tmp/megamobi-pwned"


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {EVIDENCE}",))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    import os

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "payload": Exploit()}, path)
    if os.path.exists(EVIDENCE):
        os.remove(EVIDENCE)
    with pytest.raises(RuntimeError, match="refused to load"):
        SafeTorchCheckpointEngine().load(str(path))
    assert not os.path.exists(EVIDENCE)


def test_tensors_and_deepspeed_objects_still_load(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.optimizer_states, "state": torch.arange(3)}}, path)
    loaded = SafeTorchCheckpointEngine().load(str(path))
    assert loaded["optimizer_state_dict"]["zero_stage"] == ZeroStageEnum.optimizer_states
    assert torch.equal(loaded["optimizer_state_dict"]["state"], torch.arange(3))
