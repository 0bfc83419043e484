"""A complete third-party qwenhw backend in one file: plain transformers, eager attention, CPU only."""

import qwenhw


class EagerBackend(qwenhw.Backend):
    name = "example-eager"
    description = "plain transformers with eager attention on the CPU (the plugin-guide example)"
    vendors = ("cpu",)

    def plans(self, spec, hardware, request):
        weights = (spec.weight_bytes or 2 * spec.total_params()) / 2**30
        ram = hardware.node.cpu.ram_bytes / 2**30
        yield qwenhw.Plan(
            model=spec.name, backend=self.name, engine="eager", fits=weights < 0.8 * ram,
            devices=(qwenhw.DeviceUse("cpu", "cpu", capacity_gib=0.8 * ram, weights_gib=weights),),
            estimate=qwenhw.Estimate(decode_tok_s=1.0, throughput_tok_s=1.0, bound="a modest guess"),
            reasons=(f"{weights:.2f} GiB of weights in {ram:.0f} GiB of RAM",),
        )

    def load(self, plan):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from qwenhw.engine.hf import HFEngine

        model = AutoModelForCausalLM.from_pretrained(plan.model_path, dtype="bfloat16", attn_implementation="eager")
        return HFEngine(model, AutoTokenizer.from_pretrained(plan.model_path), plan=plan)


@qwenhw.hookimpl
def register_backends(register):
    register(EagerBackend())
