"""appliance.power: the device power manager and its host-side simulator.

Device (frozen into appliance-agent; stdlib only, no numpy/matplotlib):
  profile  - boards/NAME.power.toml or board.json key "power" -> validated `Profile`
  model    - power model P = k_cal*sum(u*C*V^2*f) + leakage + idle-state + platform
  planner  - pure decisions: OPP choice (queue, prediction, critical speed, thermal cap), sleep
  predictor- pluggable demand predictors (EWMA, daily-seasonal, max) + measure()
  sysfs    - cpufreq / hotplug / thermal / RTC / procfs access under configurable roots
  agent    - `appliance-agent power run` (main(argv))
Host (appliance-power = cli:main; numpy, matplotlib lazily):
  traces   - reproducible trace generators and the CSV format
  sim      - queue + power simulator and the kernel governor models
  optimal  - YDS offline optimum
  plot     - PNG timelines and Pareto curves
"""
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
