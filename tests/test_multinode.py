"""Multi-node jobs use the conventional engines: Lightning's SLURM / torchrun detection, submitit."""

import pytest
from hydra import compose, initialize_config_module
from lightning.pytorch.plugins.environments import (
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from omegaconf import OmegaConf

from emfm import run

SLURM_JOB = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "emfm", "SLURM_JOB_ID": "7",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "node1"}
TORCHRUN = {"TORCHELASTIC_RUN_ID": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "GROUP_RANK": "0",
            "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env,expected", [(SLURM_JOB, SLURMEnvironment), (TORCHRUN, TorchElasticEnvironment)])
def test_trainer_detects_the_cluster(compose_config, monkeypatch, env: dict, expected: type) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = compose_config("pretrain", ["data.volumes=[v.zarr]", "trainer.accelerator=cpu"])
    trainer = run.build_trainer(cfg)
    assert isinstance(trainer._accelerator_connector.cluster_environment, expected)


def test_the_readme_slurm_recipe_composes_with_its_run_dir() -> None:
    overrides = ["data.volumes=[v.zarr]", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2",
                 "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=8",
                 "hydra.launcher.tasks_per_node=8", "hydra.launcher.timeout_min=1440", "hydra.launcher.partition=gpu",
                 "hydra.run.dir=runs/big", "resume=auto"]
    with initialize_config_module("emfm.configs", version_base="1.3"):
        cfg = compose("pretrain", overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (8, 2)
    # A multirun writes job N to <sweep dir>/<N>: the sweep dir is the run dir given, so the job is runs/big/0
    # at every launch and requeue (tests/test_jobs.py runs the recipe with the basic launcher).
    assert cfg.hydra.sweep.dir == "runs/big" and OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"
    assert cfg.resume == "auto"
