"""Loss values against independent computations: by hand, and TRL's sigmoid-DPO formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from align.method.losses import clip_contrastive_loss, retrieval_dpo_loss


def trl_sigmoid_dpo(pc_logps, pr_logps, rc_logps, rr_logps, beta, label_smoothing):
    """TRL's DPOTrainer 'sigmoid' loss, as its documentation states it."""
    logits = (pc_logps - pr_logps) - (rc_logps - rr_logps)
    return (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )


def test_by_hand_two_pairs():
    s_w, s_l = torch.tensor([0.30, 0.10]), torch.tensor([0.20, 0.25])
    r_w, r_l = torch.tensor([0.25, 0.10]), torch.tensor([0.20, 0.20])
    beta, tau = 0.5, 0.1
    loss, m = retrieval_dpo_loss(s_w, s_l, r_w, r_l, beta=beta, temperature=tau)
    # pair 1: delta = 0.5 / 0.1 * ((0.30 - 0.25) - (0.20 - 0.20)) = 0.25
    # pair 2: delta = 5 * ((0.10 - 0.10) - (0.25 - 0.20)) = -0.25
    expected = (math.log1p(math.exp(-0.25)) + math.log1p(math.exp(0.25))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m["dpo_accuracy"].item() == 0.5
    assert m["reward_margin"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_matches_trl_with_log_pi_equal_to_similarity_over_tau(label_smoothing):
    g = torch.Generator().manual_seed(0)
    s_w, s_l, r_w, r_l = (torch.rand(64, generator=g) * 2 - 1 for _ in range(4))
    beta, tau = 0.2, 0.07
    loss, _ = retrieval_dpo_loss(
        s_w, s_l, r_w, r_l, beta=beta, temperature=tau, label_smoothing=label_smoothing
    )
    trl = trl_sigmoid_dpo(s_w / tau, s_l / tau, r_w / tau, r_l / tau, beta, label_smoothing)
    assert loss.item() == pytest.approx(trl.mean().item(), rel=1e-6)


def test_ipo_by_hand():
    loss, _ = retrieval_dpo_loss(
        torch.tensor([0.3]), torch.tensor([0.1]), torch.tensor([0.2]), torch.tensor([0.2]),
        beta=0.5, temperature=1.0, ipo=True,
    )  # fmt: skip
    # logits = (0.3 - 0.2) - (0.1 - 0.2) = 0.2; (0.2 - 1 / (2 * 0.5))^2 = 0.64
    assert loss.item() == pytest.approx(0.64, rel=1e-5)


def test_at_the_reference_the_loss_is_log_two_and_the_gradient_prefers_chosen():
    s = torch.tensor([0.4, 0.1], requires_grad=True)
    loss, m = retrieval_dpo_loss(
        s[:1], s[1:], s[:1].detach(), s[1:].detach(), beta=1.0, temperature=0.1
    )
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    loss.backward()
    assert s.grad[0] < 0 < s.grad[1]  # descent raises s(chosen), lowers s(rejected)
    assert m["dpo_accuracy"].item() == 0.0  # no margin yet


def test_clip_contrastive_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised inside
    loss = clip_contrastive_loss(img, txt, torch.tensor(10.0))
    # Each row: logits (10, 0) with label 0 -> -log(e^10 / (e^10 + 1)) = log(1 + e^-10).
    assert loss.item() == pytest.approx(math.log1p(math.exp(-10)), abs=1e-5)  # float32
    swapped = clip_contrastive_loss(img, txt.flip(0), torch.tensor(10.0))
    assert swapped.item() == pytest.approx(10 + math.log1p(math.exp(-10)), rel=1e-4)


def _two_workers(rank: int, port: int, images, texts, scale, out) -> None:
    """One of two gloo workers: the contrastive loss of its half of the batch, with the other
    worker's rows gathered as negatives, and its gradients averaged as DDP averages them."""
    import torch.distributed as dist

    from align.method.losses import gather_across_workers

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    half = len(images) // 2
    mine = slice(rank * half, (rank + 1) * half)
    image = images[mine].clone().requires_grad_(True)
    text = texts[mine].clone().requires_grad_(True)
    loss = clip_contrastive_loss(gather_across_workers(image), gather_across_workers(text), scale)
    loss.backward()
    grads = torch.cat([image.grad, text.grad]).numpy()  # by value: the process exits next
    dist.destroy_process_group()
    out.put((rank, loss.item(), grads))


def test_two_workers_train_on_the_global_batch_as_one_process_would():
    """Two gloo workers with half a batch each: the loss is the one-process loss of the whole
    batch, and each worker's gradient is the one-process gradient of its rows (DDP then
    averages parameter gradients: the global gradient over 2). Local negatives would not be."""
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    torch.manual_seed(0)
    images, texts, scale = torch.randn(8, 16), torch.randn(8, 16), torch.tensor(10.0)
    whole_image, whole_text = (
        images.clone().requires_grad_(True),
        texts.clone().requires_grad_(True),
    )
    expected = clip_contrastive_loss(whole_image, whole_text, scale)
    expected.backward()
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    workers = [
        ctx.Process(target=_two_workers, args=(r, port, images, texts, scale, out))
        for r in range(2)
    ]
    for w in workers:
        w.start()
    results = sorted(out.get(timeout=120) for _ in workers)
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    for rank, loss, grads in results:
        assert loss == pytest.approx(expected.item(), rel=1e-5)
        rows = slice(rank * 4, (rank + 1) * 4)
        assert torch.allclose(torch.from_numpy(grads), torch.cat([whole_image.grad[rows], whole_text.grad[rows]]),
                              atol=1e-6)  # fmt: skip
    local = clip_contrastive_loss(images[:4], texts[:4], scale).item()
    assert local != pytest.approx(expected.item(), rel=1e-3)  # the test can tell the difference
