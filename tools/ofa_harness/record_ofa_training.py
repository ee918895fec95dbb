"""Record updates of OFA's own `train.py` (SCST and the encouraging loss) for our exactness tests.

Runs in OFA's environment (Python 3.8, torch 1.8.1, OFA-Sys/OFA at a36b91ce: see the harness's
`setup_ofa_env.sh`), with OFA's train.py command line after `--`:

    NLTK_DATA=PEER/nltk_data PEER/venv/bin/python tools/ofa_harness/record_ofa_training.py \
        --ofa-src PEER/src --record OUT.pt -- DATA --user-dir=PEER/src/ofa_module ...

It imports OFA's `train` module and calls its `cli_main`. Observers wrap OFA's methods and return
what they return, so training is unchanged:

* `Trainer.train_step`: the batches of each update (every tensor but the images, of which the
  sum and sum of squares are kept), and after the update the value of every parameter listed in
  ``--keep-params``, plus sum and sum of squares (float64) of every parameter and of its change;
* `Trainer.clip_grad_norm`: the gradient norm before clipping;
* the criterion's `forward` in training mode: loss, sample size, logging output; for SCST also the
  sampled captions (token ids, text), the references, CIDEr-D scores, rewards and the
  log-probability of every sampled token (from OFA's `scst_loss` function).
"""
import argparse
import os
import sys

import torch


def tensor_stats(tensor):
    value = tensor.detach().double()
    return [float(value.sum()), float((value * value).sum())]


def plain(value):
    """Tensors to CPU copies, numpy arrays to lists, containers recursively."""
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def batch_record(sample):
    record = plain({key: value for key, value in sample.items() if key != "net_input"})
    net_input = dict(sample["net_input"])
    images = net_input.pop("patch_images")
    record["net_input"] = plain(net_input)
    record["patch_images_stats"] = tensor_stats(images)
    record["patch_images_shape"] = list(images.shape)
    return record


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ofa-src", required=True, help="OFA's source tree (its train.py, trainer.py, ...)")
    parser.add_argument("--record", required=True, help="torch file to write the observations to")
    parser.add_argument("--keep-params", default="", help="comma-separated parameters whose values are kept")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then train.py's arguments")
    args = parser.parse_args()
    train_args = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    keep = [name for name in args.keep_params.split(",") if name]
    sys.path.insert(0, os.path.abspath(args.ofa_src))

    import train as ofa_train  # OFA's train.py
    import trainer as ofa_trainer
    from criterions import label_smoothed_encouraging_loss, scst_loss

    record = {"argv": train_args, "updates": []}
    current = {}

    clip_grad_norm = ofa_trainer.Trainer.clip_grad_norm

    def observed_clip_grad_norm(self, clip_norm):
        norm = clip_grad_norm(self, clip_norm)
        current["grad_norm"] = float(norm)
        return norm

    train_step = ofa_trainer.Trainer.train_step

    def observed_train_step(self, samples, raise_oom=False):
        before = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        current.clear()
        current.update(batches=[batch_record(s) for s in samples], criterion=[], num_updates=self.get_num_updates(),
                       lr=self.get_lr())
        output = train_step(self, samples, raise_oom)
        params = dict(self.model.named_parameters())
        current["param_stats"] = {name: tensor_stats(p) for name, p in params.items()}
        current["delta_stats"] = {name: tensor_stats(p.detach() - before[name]) for name, p in params.items()}
        current["params"] = {name: params[name].detach().clone() for name in keep}
        record["updates"].append(dict(current))
        return output

    ofa_trainer.Trainer.clip_grad_norm = observed_clip_grad_norm
    ofa_trainer.Trainer.train_step = observed_train_step

    def observe_forward(cls, extra=None):
        forward = cls.forward

        def observed_forward(self, model, sample, update_num=0, reduce=True):
            training = model.training
            seen = {}
            if extra is not None:
                extra(self, seen, training)
            loss, sample_size, logging_output = forward(self, model, sample, update_num=update_num, reduce=reduce)
            seen.update(scst_observed)
            scst_observed.clear()
            if training and "criterion" in current:
                seen.update(loss=plain(loss), sample_size=plain(sample_size), logging_output=plain(logging_output),
                            update_num=update_num)
                current["criterion"].append(seen)
            return loss, sample_size, logging_output

        cls.forward = observed_forward

    scst_cls = scst_loss.ScstRewardCriterion
    get_generator_out = scst_cls.get_generator_out
    get_reward_and_scores = scst_cls.get_reward_and_scores

    def scst_observers(criterion, seen, training):
        def observed_generator_out(self, model, sample):
            gen_target, gen_res, gt_res = get_generator_out(self, model, sample)
            seen.update(gen_target=[t.tolist() for t in gen_target], gen_res=list(gen_res), gt_res=plain(gt_res))
            return gen_target, gen_res, gt_res

        def observed_reward(self, gen_res, gt_res, device):
            reward, scores = get_reward_and_scores(self, gen_res, gt_res, device)
            seen.update(reward=plain(reward), scores=plain(scores))
            return reward, scores

        criterion.get_generator_out = observed_generator_out.__get__(criterion)
        criterion.get_reward_and_scores = observed_reward.__get__(criterion)

    loss_of_samples = scst_loss.scst_loss

    def observed_scst_loss(lprobs, target, reward, ignore_index=None, reduce=True):
        # the log-probability of every sampled token (padding 0): the model's side of the loss
        token_lprobs = lprobs.detach().gather(-1, target.unsqueeze(-1)).squeeze(-1)
        if ignore_index is not None:
            token_lprobs = token_lprobs.masked_fill(target.eq(ignore_index), 0.0)
        scst_observed["token_lprobs"] = token_lprobs.cpu().clone()
        return loss_of_samples(lprobs, target, reward, ignore_index=ignore_index, reduce=reduce)

    scst_observed = {}
    scst_loss.scst_loss = observed_scst_loss
    observe_forward(scst_cls, scst_observers)
    observe_forward(label_smoothed_encouraging_loss.AdjustLabelSmoothedEncouragingLossCriterion)

    sys.argv = ["train.py"] + train_args
    ofa_train.cli_main()
    torch.save(record, args.record)
    print(f"recorded {len(record['updates'])} updates to {args.record}")


if __name__ == "__main__":
    main()
