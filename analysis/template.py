"""The jinja2 template of report.html (kept in Python so it ships with the package)."""

REPORT_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Headroom report — {{ experiment }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
 table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 14px; }
 th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
 th { background: #f2f2f2; } td.l, th.l { text-align: left; }
 tr.failed td { background: #fde8e8; } .fail { color: #b00020; font-weight: bold; }
 .how { color: #555; font-size: 13px; margin: .2em 0 .4em; } figure { margin: 1.2em 0; }
 img { max-width: 100%; border: 1px solid #eee; } code { font-size: 13px; }
 .warn { color: #8a5a00; font-size: 13px; }
 .verdict.significant { color: #0a6b0a; font-weight: bold; } .verdict.within-noise { color: #555; font-style: italic; }
 .verdict.not-testable { color: #8a5a00; } tr.best td { background: #f4f8ff; }
</style></head><body>
<h1>Headroom report — {{ experiment }}</h1>
<p>{{ runs|length }} run director{{ "y" if runs|length == 1 else "ies" }}; generated from the recorded files only
(nothing was re-run).</p>

{% for r in runs %}
<h2>Run {{ r.label }}</h2>
<p><code>{{ r.path }}</code></p>
<table>
 <tr><th class="l">git SHA</th><td class="l"><code>{{ r.facts.git_sha or "unknown" }}</code></td></tr>
 <tr><th class="l">kernel</th><td class="l">{{ r.facts.kernel or "unknown" }}</td></tr>
 <tr><th class="l">backend</th><td class="l">{{ r.facts.backend or "unknown" }}</td></tr>
 <tr><th class="l">delay mechanism</th><td class="l">{{ r.facts.delay_mechanism or "not recorded" }}
   {% if r.facts.loss_mechanism %}(loss: {{ r.facts.loss_mechanism }}){% endif %}</td></tr>
 {% if r.facts.resources %}<tr><th class="l">resources created</th><td class="l">
   {% for k, n in r.facts.resources.items() %}{{ n }} {{ k }}{% if not loop.last %}, {% endif %}{% endfor %}</td></tr>{% endif %}
 <tr><th class="l">model / workload</th><td class="l">{{ r.model }} — {{ r.workload }}</td></tr>
 {% if r.sweep_point %}<tr><th class="l">sweep point</th><td class="l">{{ r.sweep_point }}</td></tr>{% endif %}
 <tr><th class="l">re-partition every</th><td class="l">{{ r.config.get("repartition_every_tokens", "—") }} tokens</td></tr>
</table>

<h3>Topology {{ r.topo.name or "" }}</h3>
{% if r.topo.hosts %}
<table><tr><th class="l">host</th><th>memory limit [MiB]</th><th>CPU cores</th><th class="l">role</th></tr>
{% for h in r.topo.hosts %}<tr><td class="l">{{ h.name }}</td><td>{{ h.mem_limit_mib }}</td><td>{{ h.cpu_cores }}</td>
 <td class="l">{{ "source" if h.source else "" }}{{ (" (" ~ h.profile ~ ")") if h.profile else "" }}</td></tr>{% endfor %}
</table>
<table><tr><th class="l">link</th><th>bandwidth [Mbit/s]</th><th>delay [ms]</th><th>loss [%]</th></tr>
{% for l in r.topo.links %}<tr><td class="l">{{ l.a }}–{{ l.b }}</td><td>{{ l.bandwidth_mbps }}</td><td>{{ l.delay_ms }}</td>
 <td>{{ l.loss_pct if l.loss_pct is not none else 0 }}</td></tr>{% endfor %}
</table>
{% else %}<p class="warn">No topology in config.resolved.yaml.</p>{% endif %}
{% if r.facts.network %}<h3>Network at bring-up: spec vs measured ({{ r.facts.network.mechanism }})</h3>
<table><tr><th>link direction</th><th>spec Mbit/s</th><th>tc Mbit/s</th><th>delay ms</th><th>jitter ms</th><th>loss %</th></tr>
{% for l in r.facts.network.links %}<tr><td class="l">{{ l.link }}</td><td>{{ l.spec_mbps }}</td><td>{{ "%.2f"|format(l.tc_mbps) }}</td>
 <td>{{ l.delay_ms }}</td><td>{{ l.jitter_ms }}</td><td>{{ l.loss_pct }}</td></tr>{% endfor %}</table>
<table><tr><th>pair</th><th>hops</th><th>spec RTT ms</th><th>measured RTT ms (raw)</th><th>added by the links</th><th>jitter ms (spec / measured)</th><th>within 5 % or 0.3 ms</th></tr>
{% for p in r.facts.network.paths %}<tr><td class="l">{{ p.pair }}</td><td>{{ p.hops }}</td><td>{{ p.expected_rtt_ms }}</td>
 <td>{{ p.measured_rtt_ms }}</td><td>{{ p.added_rtt_ms }}</td><td>{{ p.expected_jitter_ms }} / {{ p.measured_jitter_ms }}</td>
 <td class="l">{% if p.rtt_ok %}yes{% else %}<span class="fail">no</span>{% endif %}</td></tr>{% endfor %}</table>
{% endif %}
{% if r.timeline %}<p>Scenario: {% for c in r.timeline %}<br>&nbsp;• {{ c }}{% endfor %}</p>{% endif %}

<h3>Summary</h3>
<table>
<tr><th class="l">algorithm</th><th>mean latency [ms]</th><th>95 % CI [ms]</th><th>× resource_aware</th><th>p50 [ms]</th><th>p95 latency [ms]</th>
<th>mean excl. migration stalls [ms]</th><th>repetitions</th><th>tokens</th><th>migrations (blocks)</th><th>migrated [MiB]</th><th>max peak mem [MiB]</th><th>95 % CI [MiB]</th>
<th class="l">memory ran out at</th><th class="l">status</th></tr>
{% for row in r.table %}
<tr class="{{ 'failed' if row.failed else '' }}"><td class="l">{{ row.algorithm }}</td>
 <td>{{ row.mean_ms }}</td><td>{{ row.ci_ms }}</td><td>{{ row.ratio }}</td><td>{{ row.p50_ms }}</td><td>{{ row.p95_ms }}</td><td>{{ row.mean_mig_ms }}</td>
 <td>{{ row.reps }}</td><td>{{ row.tokens }}</td>
 <td>{{ row.migrations }}</td><td>{{ row.migrated_mib }}</td><td>{{ row.peak_mib }}</td><td>{{ row.peak_ci_mib }}</td><td class="l">{{ row.context }}</td>
 <td class="l">{% if row.failed %}<span class="fail">{{ row.status }}</span>{% else %}{{ row.status }}{% endif %}</td></tr>
{% endfor %}
</table>
<p class="how">Latencies are over decode tokens and include the stall of a migration made just before a token
(summary.json's definition); "excl. migration stalls" leaves each token's migration_s out. Ratios use the mean latency.
95 % CI: Student-t interval of the mean over the per-repetition means (latency) or per-repetition largest peaks (memory);
p50/p95 over all decode tokens of all repetitions. "Memory ran out at": tokens generated (and context length) before memory ran out.</p>
{% if r.varied %}<p class="how">Repetitions varied: {% for k, v in r.varied.items() %}{% if v is not none %}<br>&nbsp;• {{ k }}: {{ v }}{% endif %}{% endfor %}</p>{% endif %}

{% if r.significance %}<h3>Differences: significant or within noise</h3>
<table class="significance">
<tr><th class="l">comparison</th><th class="l">metric</th><th>mean a</th><th>mean b</th><th>a / b</th><th>repetitions a / b</th><th class="l">verdict</th><th class="l">why</th></tr>
{% for s in r.significance %}
<tr class="{{ 'best' if s.best else '' }}"><td class="l">{{ s.a }} vs {{ s.b }}{% if s.best %} <b>(best other)</b>{% endif %}</td><td class="l">{{ s.metric }}</td>
 <td>{{ s.mean_a }} {{ s.unit }}</td><td>{{ s.mean_b }} {{ s.unit }}</td><td>{{ s.ratio }}</td><td>{{ s.n }}</td>
 <td class="l"><span class="verdict {{ s.css }}">{{ s.verdict }}</span>{% if s.failed %} <span class="warn">(a failed algorithm: partial data)</span>{% endif %}</td><td class="l">{{ s.reason }}</td></tr>
{% endfor %}
</table>
<p class="how">Welch's two-sided t-test at the 5 % level over per-repetition values: "significant" when |t| exceeds the
Student-t critical value at the Welch–Satterthwaite degrees of freedom; with no spread across repetitions (a deterministic
backend) any difference is significant; "not testable" with fewer than two repetitions on a side.</p>{% endif %}

{% if r.failures %}<h3>Failures</h3><ul>
{% for f in r.failures %}<li><span class="fail">{{ f.algorithm }}: {{ f.short }}</span> — <code>{{ f.reason }}</code></li>{% endfor %}
</ul>{% endif %}
{% if r.problems %}<p class="warn">Partial or damaged input (read what was there):{% for p in r.problems %}<br>&nbsp;• {{ p }}{% endfor %}</p>{% endif %}

{% for f in r.figures %}
<figure><h4>{{ f.title }}</h4><p class="how">How to read: {{ f.how_to_read }}</p>
<img src="{{ f.src }}" alt="{{ f.title }}"> <p class="how"><a href="{{ f.pdf }}">PDF</a></p></figure>
{% endfor %}
{% endfor %}

{% if sweep_figures %}<h2>Across runs</h2>
{% for f in sweep_figures %}
<figure><h4>{{ f.title }}</h4><p class="how">How to read: {{ f.how_to_read }}</p>
<img src="{{ f.src }}" alt="{{ f.title }}"> <p class="how"><a href="{{ f.pdf }}">PDF</a></p></figure>
{% endfor %}{% endif %}
</body></html>
"""
