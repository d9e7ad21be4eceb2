# Coffer workload policy rules: the same text for every workload, followed in the delivered
# policy.rego by `policy_data := {...}` (the compiled workload policy, see coffer.policy.engine).
#
# Every request rule evaluates to {"allowed", "ops", "reasons", "container"}:
#   allowed   -- true only when no check failed (deny by default: a rule that cannot be evaluated
#                yields its default, a denial);
#   ops       -- JSON-patch operations (add/replace/remove) on the persistent state, applied by the
#                agent only when the request is allowed;
#   reasons   -- every failed check, in plain words (empty when allowed);
#   container -- the policy container the request concerns, when there is one.
#
# The policy data is read at data.agent_policy.policy_data: in the delivered text that is the
# `policy_data` rule of this package; Coffer's engine loads the same JSON there as a base document.
# The persistent state is input.pstate ({"containers": {container_id: index}, "sandbox": {...}}):
# the agent adds it to every request (a request carrying its own "pstate" is refused before
# evaluation). Checks are written as "not ok" so that a missing or mistyped field fails them.
package agent_policy

import rego.v1

pd := data.agent_policy.policy_data

# --- helpers ---------------------------------------------------------------------------------------

q(x) := json.marshal(x)

obj(x) := x if is_object(x)

obj(x) := {} if not is_object(x)

list_ok(x) if is_array(x)

list_ok(x) if is_null(x)

lst(x) := x if is_array(x)

lst(x) := [] if is_null(x)

empty_list(x) if is_null(x)

empty_list(x) if {
	is_array(x)
	count(x) == 0
}

ptr(s) := replace(replace(s, "~", "~0"), "/", "~1")

deny(reason) := {"allowed": false, "ops": [], "reasons": [reason], "container": null}

allow_plain := {"allowed": true, "ops": [], "reasons": [], "container": null}

result(violations, ops, name) := {
	"allowed": count(violations) == 0,
	"ops": ops,
	"reasons": [m | some m in violations],
	"container": name,
}

# The policy container a container id was created as (through CreateContainerRequest).
state_known if pd.containers[input.pstate.containers[input.container_id]]

state_c := pd.containers[input.pstate.containers[input.container_id]]

not_created(req) := deny(sprintf(
	"%s: container id %s was not created through the policy (or has been removed)",
	[req, q(object.get(input, "container_id", null))],
))

# --- environment, user, capabilities (shared by CreateContainer and ExecProcess) -------------------

env_ok(e, rules) if rules.exact[e]

env_ok(e, rules) if {
	is_string(e)
	i := indexof(e, "=")
	i > 0
	some p in rules.patterns[substring(e, 0, i)]
	regex.match(p, substring(e, i + 1, -1))
}

env_problem(e, _) := sprintf("env entry of type %s is not NAME=VALUE", [type_name(e)]) if not is_string(e)

env_problem(e, _) := sprintf("env entry %s is not NAME=VALUE", [q(e)]) if {
	is_string(e)
	indexof(e, "=") < 1
}

env_problem(e, rules) := msg if {
	is_string(e)
	i := indexof(e, "=")
	i > 0
	not env_ok(e, rules)
	name := substring(e, 0, i)
	not rules.names[name]
	msg := sprintf("env %s is not allowed (%s)", [name, rules.allowed])
}

env_problem(e, rules) := msg if {
	is_string(e)
	i := indexof(e, "=")
	i > 0
	not env_ok(e, rules)
	name := substring(e, 0, i)
	hint := rules.names[name]
	msg := sprintf("env %s has a value the policy does not allow (it %s)", [name, hint])
}

env_problems(env, rules) := ["Env is not a list of NAME=VALUE strings"] if not list_ok(env)

env_problems(env, rules) := [m | some e in lst(env); m := env_problem(e, rules)] if list_ok(env)

gids_equal(x, want) if {
	empty_list(x)
	count(want) == 0
}

gids_equal(x, want) if {
	is_array(x)
	{g | some g in x} == {g | some g in want}
}

user_problems(u, pu) := array.concat(
	array.concat(
		[sprintf("user id %s is not the policy's %d", [q(uid), pu.uid]) |
			uid := object.get(u, "UID", null)
			uid != pu.uid
		],
		[sprintf("group id %s is not the policy's %d", [q(gid), pu.gid]) |
			gid := object.get(u, "GID", null)
			gid != pu.gid
		],
	),
	[sprintf("additional groups %s are not the policy's %s", [q(gids), q(pu.additional_gids)]) |
		gids := object.get(u, "AdditionalGids", null)
		not gids_equal(gids, pu.additional_gids)
	],
)

cap_name(c) := upper(c) if startswith(upper(c), "CAP_")

cap_name(c) := concat("", ["CAP_", upper(c)]) if not startswith(upper(c), "CAP_")

cap_allowed(c, allowed) if {
	is_string(c)
	cap_name(c) in allowed
}

# --- CreateSandboxRequest --------------------------------------------------------------------------

default CreateSandboxRequest := {"allowed": false, "ops": [], "reasons": ["CreateSandbox: the request could not be evaluated"], "container": null}

CreateSandboxRequest := result(cs_v, cs_ops, null)

cs_ops := [{"op": "add", "path": "/sandbox", "value": {
	"sandbox_id": object.get(input, "sandbox_id", null),
	"name": object.get(input, "name", null),
	"namespace": object.get(input, "namespace", null),
}}]

cs_v contains sprintf("CreateSandbox: sandbox name %s is not the policy's %s (or a name a controller generates from it, %s)", [q(name), q(pd.name), q(sprintf("%s-...", [pd.name]))]) if {
	name := object.get(input, "name", null)
	not cs_name_ok(name)
}

# A Deployment, StatefulSet, Job, ... names its pods <name>-<suffix>; a bare Pod has exactly its name.
cs_name_ok(name) if name == pd.name

cs_name_ok(name) if {
	is_string(name)
	count(name) <= 253
	startswith(name, sprintf("%s-", [pd.name]))
	regex.match(`^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$`, name)
}

cs_v contains sprintf("CreateSandbox: namespace %s is not the policy's %s", [q(ns), q(pd.namespace)]) if {
	pd.namespace != null
	ns := object.get(input, "namespace", null)
	ns != pd.namespace
}

cs_v contains sprintf("CreateSandbox: storages %s are not allowed (the policy allows none)", [q(s)]) if {
	s := object.get(input, "storages", null)
	not empty_list(s)
}

cs_v contains sprintf("CreateSandbox: guest hook path %s is not allowed", [q(h)]) if {
	h := object.get(input, "guest_hook_path", "")
	not h in {"", null}
}

cs_v contains sprintf("CreateSandbox: kernel modules %s are not allowed (the policy allows none)", [q(k)]) if {
	k := object.get(input, "kernel_modules", null)
	not empty_list(k)
}

cs_v contains "CreateSandbox: sandbox_pidns must be false (a shared pid namespace is not allowed)" if {
	object.get(input, "sandbox_pidns", false) != false
}

cs_v contains "CreateSandbox: the sandbox has already been created" if {
	object.get(object.get(input, "pstate", {}), "sandbox", null) != null
}

# --- CreateContainerRequest ------------------------------------------------------------------------

default CreateContainerRequest := {"allowed": false, "ops": [], "reasons": ["CreateContainer: the request could not be evaluated"], "container": null}

cc_index := pd.container_index[input.name]

cc_known if pd.containers[cc_index]

CreateContainerRequest := deny(sprintf(
	"CreateContainer: no container named %s in the policy",
	[q(object.get(input, "name", null))],
)) if not cc_known

# The common case, an allowed request, is decided by cc_fast: cheap checks at least as strict as
# every check in cc_v. Anything it does not admit goes through cc_v, which explains the denial.
CreateContainerRequest := {"allowed": true, "ops": cc_ops, "reasons": [], "container": cc.name} if {
	cc_known
	cc_fast
}

CreateContainerRequest := result(cc_v, cc_ops, cc.name) if {
	cc_known
	not cc_fast
}

cc_fast if {
	cc_id_ok
	not input.pstate.containers[input.container_id]
	cc_image_ok
	cc_proc.Args == cc.args
	cc_proc.Cwd == cc.working_dir
	u := cc_proc.User
	u.UID == cc.user.uid
	u.GID == cc.user.gid
	u.AdditionalGids == cc.user.additional_gids
	cc_oci.Hooks == null
	env := cc_proc.Env
	is_array(env)
	every e in env {
		env_fast(e, cc.env)
	}
	every n in cc.env.required {
		env_name_present(env, n)
	}
	every s in ["Bounding", "Effective", "Permitted"] {
		is_array(cc_caps[s])
		every c in cc_caps[s] {
			c in cc.capabilities
		}
	}
	cc_caps.Inheritable == []
	cc_caps.Ambient == []
	cc_linux.Devices == []
	is_array(cc_linux.MaskedPaths)
	count(cc_linux.MaskedPaths) > 0
	cc_nnp_ok
	cc_root_ok
	is_array(cc_mounts)
	every m in cc_mounts {
		mount_ok(m, cc.mounts)
	}
	every pm in cc.mounts {
		cc_mount_present(pm.destination)
	}
}

env_fast(e, rules) if rules.exact[e]

env_fast(e, rules) if {
	not rules.exact[e]
	env_ok(e, rules)
}

cc_nnp_ok if not cc.no_new_privileges

cc_nnp_ok if cc_proc.NoNewPrivileges == true

cc_root_ok if not cc.read_only_root

cc_root_ok if cc_oci.Root.Readonly == true

cc := pd.containers[cc_index]

cc_ops := [{"op": "add", "path": concat("/", ["", "containers", ptr(input.container_id)]), "value": cc_index}]

ccp := sprintf("CreateContainer: container %s: ", [q(cc.name)])

cc_oci := obj(object.get(input, "OCI", {}))

cc_proc := obj(object.get(cc_oci, "Process", {}))

cc_linux := obj(object.get(cc_oci, "Linux", {}))

cc_caps := obj(object.get(cc_proc, "Capabilities", {}))

cc_id_ok if {
	is_string(input.container_id)
	input.container_id != ""
}

cc_v contains concat("", [ccp, "the request has no container id"]) if not cc_id_ok

cc_v contains concat("", [ccp, sprintf("container id %s is already in use", [q(input.container_id)])]) if {
	cc_id_ok
	object.get(input.pstate.containers, input.container_id, null) != null
}

cc_image_ok if input.image == cc.image
else := true if {
	cc.image_regex != null
	is_string(input.image)
	regex.match(cc.image_regex, input.image)
}

cc_v contains concat("", [ccp, sprintf("image %s is not the policy's image %s", [q(img), q(cc.image)])]) if {
	not cc_image_ok
	img := object.get(input, "image", null)
}

cc_v contains concat("", [ccp, sprintf("args %s differ from the policy's %s", [q(args), q(cc.args)])]) if {
	args := object.get(cc_proc, "Args", null)
	args != cc.args
}

cc_v contains concat("", [ccp, m]) if {
	some m in env_problems(object.get(cc_proc, "Env", []), cc.env)
}

cc_v contains concat("", [ccp, sprintf("env %s is missing (the policy requires it: %s)", [q(n), cc.env.names[n]])]) if {
	some n in cc.env.required
	not env_name_present(lst(object.get(cc_proc, "Env", [])), n)
}

env_name_present(env, n) if {
	some e in env
	is_string(e)
	startswith(e, concat("", [n, "="]))
}

cc_v contains concat("", [ccp, sprintf("mount %s is missing (the policy requires it)", [q(pm.destination)])]) if {
	some pm in cc.mounts
	not cc_mount_present(pm.destination)
}

cc_mount_present(d) if {
	some m in lst(object.get(cc_oci, "Mounts", []))
	is_object(m)
	m.destination == d
}

cc_v contains concat("", [ccp, sprintf("working directory %s is not the policy's %s", [q(cwd), q(cc.working_dir)])]) if {
	cwd := object.get(cc_proc, "Cwd", null)
	cwd != cc.working_dir
}

cc_v contains concat("", [ccp, m]) if {
	some m in user_problems(obj(object.get(cc_proc, "User", {})), cc.user)
}

cap_sets := ["Bounding", "Effective", "Permitted", "Inheritable", "Ambient"]

cc_v contains concat("", [ccp, sprintf("Process.Capabilities.%s is not a list", [s])]) if {
	some s in cap_sets
	not list_ok(object.get(cc_caps, s, null))
}

cc_v contains concat("", [ccp, msg]) if {
	not cc.privileged
	some s in ["Bounding", "Effective", "Permitted"]
	some c in lst(object.get(cc_caps, s, null))
	not cap_allowed(c, cc.capabilities)
	msg := sprintf(
		"capability %s in Process.Capabilities.%s is not allowed (the container is not privileged; allowed: %s)",
		[q(c), s, cc.capabilities_text],
	)
}

cc_v contains concat("", [ccp, msg]) if {
	not cc.privileged
	some s in ["Inheritable", "Ambient"]
	caps := lst(object.get(cc_caps, s, null))
	count(caps) > 0
	msg := sprintf("Process.Capabilities.%s must be empty unless the container is privileged (has %s)", [s, q(caps)])
}

cc_v contains concat("", [ccp, msg]) if {
	not cc.privileged
	devs := object.get(cc_linux, "Devices", null)
	not empty_list(devs)
	paths := [object.get(obj(d), "path", null) | some d in lst(devs)]
	msg := sprintf("Linux.Devices %s makes the container privileged, which the policy does not allow", [q(paths)])
}

cc_v contains concat("", [ccp, "Linux.Devices is not a list"]) if not list_ok(object.get(cc_linux, "Devices", null))

cc_v contains concat("", [ccp, "Linux.MaskedPaths is empty, which unmasks /proc and /sys as for a privileged container; the policy does not allow that"]) if {
	not cc.privileged
	empty_list(object.get(cc_linux, "MaskedPaths", null))
}

cc_v contains concat("", [ccp, "Linux.MaskedPaths is not a list"]) if not list_ok(object.get(cc_linux, "MaskedPaths", null))

cc_v contains concat("", [ccp, "Process.NoNewPrivileges must be true"]) if {
	cc.no_new_privileges
	object.get(cc_proc, "NoNewPrivileges", false) != true
}

cc_v contains concat("", [ccp, "the root filesystem must be read-only (Root.Readonly must be true)"]) if {
	cc.read_only_root
	object.get(obj(object.get(cc_oci, "Root", {})), "Readonly", false) != true
}

cc_v contains concat("", [ccp, "OCI.Hooks must be null (hooks run host-chosen programs)"]) if {
	object.get(cc_oci, "Hooks", null) != null
}

cc_mounts := object.get(cc_oci, "Mounts", [])

cc_v contains concat("", [ccp, "OCI.Mounts is not a list"]) if not list_ok(cc_mounts)

mount_ok(m, _) if pd.common.default_mounts[m.destination] == m.type

mount_ok(m, pms) if {
	some pm in pms
	m.destination == pm.destination
	m.type == pm.type
	sort(m.options) == pm.options
	is_string(m.source)
	source_ok(pm, m.source)
}

# A policy mount's source: exact, or the runtime's shared directory of THIS container (prefix, the
# request's container id, suffix: another container's volume is not this one's), or a regex.
source_ok(pm, s) if s == pm.source_exact

source_ok(pm, s) if {
	id := input.container_id
	is_string(id)
	id != ""
	not contains(id, "/")
	s == concat("", [pm.source_prefix, id, pm.source_suffix])
}

source_ok(pm, s) if {
	not pm.source_exact
	not pm.source_prefix
	regex.match(pm.source_regex, s)
}

mount_hint(m, pms) := h if {
	hs := [sprintf(" (the policy mounts %s from %s, type %s, options %s)", [q(pm.destination), q(pm.source), q(pm.type), q(pm.options)]) |
		some pm in pms
		pm.destination == m.destination
	]
	count(hs) > 0
	h := hs[0]
} else := " (not in the policy, nor one of the runtime's standard mounts)"

cc_v contains concat("", [ccp, msg]) if {
	some mnt in lst(cc_mounts)
	m := obj(mnt)
	not mount_ok(m, cc.mounts)
	msg := sprintf("mount of %s (type %s, source %s, options %s) is not allowed%s", [
		q(object.get(m, "destination", null)), q(object.get(m, "type", null)),
		q(object.get(m, "source", null)), q(object.get(m, "options", null)), mount_hint(m, cc.mounts),
	])
}

# --- ExecProcessRequest ----------------------------------------------------------------------------

default ExecProcessRequest := {"allowed": false, "ops": [], "reasons": ["ExecProcess: the request could not be evaluated"], "container": null}

ExecProcessRequest := not_created("ExecProcess") if not state_known

ExecProcessRequest := {"allowed": true, "ops": [], "reasons": [], "container": state_c.name} if {
	state_known
	ep_fast
}

ExecProcessRequest := result(ep_v, [], state_c.name) if {
	state_known
	not ep_fast
}

# As cc_fast: at least as strict as every check in ep_v.
ep_fast if {
	ep_args in state_c.allow.exec
	env := ep_proc.Env
	is_array(env)
	every e in env {
		env_fast(e, state_c.env)
	}
	u := ep_proc.User
	u.UID == state_c.user.uid
	u.GID == state_c.user.gid
	u.AdditionalGids == state_c.user.additional_gids
	object.get(ep_proc, "Capabilities", null) == null
	ep_proc.Cwd == state_c.working_dir
	[state_c.no_new_privileges, object.get(ep_proc, "NoNewPrivileges", state_c.no_new_privileges)] in fast_flag_ok
}

epp := sprintf("ExecProcess: container %s: ", [q(state_c.name)])

ep_proc := obj(object.get(input, "process", {}))

ep_args := object.get(ep_proc, "Args", null)

ep_command_ok if ep_args in state_c.allow.exec

ep_command_ok if {
	is_array(ep_args)
	count(ep_args) > 0
	every a in ep_args {
		is_string(a)
	}
	line := concat(" ", ep_args)
	some p in state_c.allow.exec_regex
	regex.match(p, line)
}

ep_v contains concat("", [epp, sprintf("command %s is not allowed (%s)", [q(ep_args), state_c.allow.exec_text])]) if {
	not ep_command_ok
}

ep_v contains concat("", [epp, m]) if {
	some m in env_problems(object.get(ep_proc, "Env", []), state_c.env)
}

ep_v contains concat("", [epp, m]) if {
	some m in user_problems(obj(object.get(ep_proc, "User", {})), state_c.user)
}

# An exec runs where the container runs and gains no privileges the container may not gain: a host
# choosing the working directory would retarget relative paths in allowed commands.
ep_v contains concat("", [epp, sprintf("process.Cwd %s is not the container's working directory %s", [q(object.get(ep_proc, "Cwd", null)), q(state_c.working_dir)])]) if {
	object.get(ep_proc, "Cwd", null) != state_c.working_dir
}

# Absent, NoNewPrivileges is the container's (the agent applies the container's setting).
ep_v contains concat("", [epp, "process.NoNewPrivileges must be true (the policy sets no_new_privileges)"]) if {
	state_c.no_new_privileges == true
	object.get(ep_proc, "NoNewPrivileges", true) != true
}

ep_caps_none(x) if is_null(x)

ep_caps_none(x) if {
	is_object(x)
	every _, v in x {
		empty_list(v)
	}
}

ep_v contains concat("", [epp, "an exec may not carry capabilities (process.Capabilities must be null or empty)"]) if {
	not ep_caps_none(object.get(ep_proc, "Capabilities", null))
}

# --- ReadStreamRequest, WriteStreamRequest, CloseStdinRequest -------------------------------------

default ReadStreamRequest := {"allowed": false, "ops": [], "reasons": ["ReadStream: the request could not be evaluated"], "container": null}

ReadStreamRequest := not_created("ReadStream") if not state_known

ReadStreamRequest := result(rs_v, [], state_c.name) if state_known

rs_v contains sprintf("ReadStream: logs of container %s are not allowed by the policy", [q(state_c.name)]) if {
	state_c.allow.logs != true
}

rs_v contains sprintf("ReadStream: stream %s is neither stdout nor stderr", [q(s)]) if {
	s := object.get(input, "stream", null)
	not s in {"stdout", "stderr"}
}

stdin_v(req) := {sprintf("%s: stdin of container %s is not allowed by the policy", [req, q(state_c.name)]) |
	state_c.allow.stdin != true
}

default WriteStreamRequest := {"allowed": false, "ops": [], "reasons": ["WriteStream: the request could not be evaluated"], "container": null}

WriteStreamRequest := not_created("WriteStream") if not state_known

WriteStreamRequest := result(stdin_v("WriteStream"), [], state_c.name) if state_known

default CloseStdinRequest := {"allowed": false, "ops": [], "reasons": ["CloseStdin: the request could not be evaluated"], "container": null}

CloseStdinRequest := not_created("CloseStdin") if not state_known

CloseStdinRequest := result(stdin_v("CloseStdin"), [], state_c.name) if state_known

# --- CopyFileRequest -------------------------------------------------------------------------------
# Files are copied into the sandbox's shared directory, often before their container is created: a
# known container id uses that container's patterns, any other id the union of every container's.

default CopyFileRequest := {"allowed": false, "ops": [], "reasons": ["CopyFile: the request could not be evaluated"], "container": null}

cf_regex := state_c.allow.copy_files_regex if state_known else := pd.copy_files_regex

cf_text := state_c.allow.copy_files_text if state_known else := pd.copy_files_text

cf_name := state_c.name if state_known else := null

cf_path := object.get(input, "path", null)

CopyFileRequest := result(cf_v, [], cf_name)

cf_match if {
	is_string(cf_path)
	some p in cf_regex
	regex.match(p, cf_path)
}

cf_v contains sprintf("CopyFile: path %s is not allowed (%s)", [q(cf_path), cf_text]) if not cf_match

cf_v contains sprintf("CopyFile: path %s has a \"..\" component", [q(cf_path)]) if {
	is_string(cf_path)
	".." in split(cf_path, "/")
}

# --- fixed answers ---------------------------------------------------------------------------------

SetPolicyRequest := deny("SetPolicy is always denied: the policy is fixed at launch by initdata")

default RemoveContainerRequest := {"allowed": true, "ops": [], "reasons": [], "container": null}

RemoveContainerRequest := {
	"allowed": true,
	"ops": [{"op": "remove", "path": concat("/", ["", "containers", ptr(input.container_id)])}],
	"reasons": [],
	"container": state_c.name,
} if state_known

DestroySandboxRequest := allow_plain

GetOOMEventRequest := allow_plain

GuestDetailsRequest := allow_plain

ListContainersRequest := allow_plain

OnlineCPUMemRequest := allow_plain

SignalProcessRequest := allow_plain

StartContainerRequest := allow_plain

StatsContainerRequest := allow_plain

TtyWinResizeRequest := allow_plain

WaitProcessRequest := allow_plain

# --- fast paths over the engine's request views ----------------------------------------------------
# Coffer's engine first evaluates fast_CreateContainerRequest / fast_ExecProcessRequest with `input`
# set to a *view* of the request: the fields the rules above read, selected in Python (lists the
# rules treat as sets sorted, string lists written as one text) so that loading and checking them is
# cheap. A fast rule only ever allows, and only with comparisons at least as strict as every check
# of its request rule; anything else (undefined, an error) makes the engine evaluate the request rule
# on the whole request, which explains a denial.
#
# A string list L is written as its *lines*: [count(L), concat("\n", L)], made only when no string
# holds a newline (the text then has count(L) - 1 of them), so equal lines are equal lists.
#
# CreateContainer view: container_id and name; pstate {"containers": {container_id: index}} (this
# id's entry only); Env, NoNewPrivileges (OCI.Process), Readonly (OCI.Root), MaskedPaths (OCI.Linux,
# cut to its first entry: only its being a non-empty list is read); MountData {destination: [type,
# source, sorted options]} for the mounts whose type is not the standard one at their destination;
# and `fixed`: {"Args", "Cwd" (OCI.Process), "User" (only UID, GID, AdditionalGids: sorted, without
# duplicates, when all integers), "Capabilities" (only the five sets, each as the lines of the sorted
# set), "Hooks" (OCI), "Devices" (OCI.Linux), "MountTypes" (the lines of the sorted
# "destination<TAB>type" of OCI.Mounts, made only when each holds one tab and no destination
# repeats), "image"}. The fast path compares `fixed` with the container's fast_fixed value.
#
# ExecProcess view: container_id; pstate as above; Args, Env, Capabilities, Cwd, NoNewPrivileges and
# User (as above) from process.

fast_CreateContainerRequest := {"allowed": true, "ops": ops, "reasons": [], "container": c.name} if {
	i := pd.container_index[input.name]
	c := pd.containers[i]
	is_string(input.container_id)
	input.container_id != ""
	not input.pstate.containers[input.container_id]
	input.fixed == data.coffer_engine.fixed[i]
	is_array(input.MaskedPaths)
	count(input.MaskedPaths) > 0
	[c.no_new_privileges, input.NoNewPrivileges] in fast_flag_ok
	[c.read_only_root, input.Readonly] in fast_flag_ok
	fast_env_ok(input.Env, c.env)
	count({n | some n in c.env.required} - {n | some n in input.EnvNames}) == 0
	count({pm.destination | some pm in c.mounts; not pd.common.default_mounts[pm.destination] == pm.type}) == count(input.MountData)
	input.MountData == {pm.destination: [pm.type, fast_source(pm), pm.options] |
		some pm in c.mounts
		not pd.common.default_mounts[pm.destination] == pm.type
	}
	ops := [{"op": "add", "path": concat("/", ["", "containers", ptr(input.container_id)]), "value": i}]
}

fast_ExecProcessRequest := {"allowed": true, "ops": [], "reasons": [], "container": c.name} if {
	c := pd.containers[input.pstate.containers[input.container_id]]
	input.Args in c.allow.exec
	input.User == {"UID": c.user.uid, "GID": c.user.gid, "AdditionalGids": c.user.additional_gids}
	object.get(input, "Capabilities", null) == null
	input.Cwd == c.working_dir
	[c.no_new_privileges, object.get(input, "NoNewPrivileges", c.no_new_privileges)] in fast_flag_ok
	fast_env_ok(input.Env, c.env)
}

# What a container's view `fixed` must be: the engine evaluates this once, when it loads the policy,
# and gives the values back as data.coffer_engine.fixed (in container order). MountTypes holds every
# standard mount's and policy mount's destination with its type.
fast_fixed := [{
	"Args": c.args,
	"Capabilities": {
		"Ambient": [0, ""], "Bounding": fast_lines(c.capabilities), "Effective": fast_lines(c.capabilities),
		"Inheritable": [0, ""], "Permitted": fast_lines(c.capabilities),
	},
	"Cwd": c.working_dir,
	"Devices": [],
	"Hooks": null,
	"MountTypes": fast_lines(sort([concat("\t", [d, t]) |
		some d, t in object.union(pd.common.default_mounts, {pm.destination: pm.type | some pm in c.mounts})
	])),
	"User": {"AdditionalGids": c.user.additional_gids, "GID": c.user.gid, "UID": c.user.uid},
	"image": c.image,
} |
	some c in pd.containers
]

fast_lines(strings) := [count(strings), concat("\n", strings)]

# [the policy's flag, the request's]: a flag the policy may require to be true.
fast_flag_ok := {[false, false], [false, true], [true, true]}

# The view's source at the policy mount's destination, when the policy mount admits it.
fast_source(pm) := s if {
	s := input.MountData[pm.destination][1]
	is_string(s)
	source_ok(pm, s)
}

# Every variable is NAME=VALUE with an exact rule, or with a value one of NAME's patterns admits.
fast_env_ok(env, rules) if {
	is_array(env)
	every e in [e | some e in env; not rules.exact[e]] {
		is_string(e)
		i := indexof(e, "=")
		i > 0
		fast_value_ok(rules, substring(e, 0, i), substring(e, i + 1, -1))
	}
}

# A value one of the variable's patterns admits: a character-class pattern's `charsets` entry
# ({"chars", "min"}: at least min characters, all from chars) states the same set as the pattern
# without a regex, and "(?s).*" (the generator's "any value") admits every string. (Separate
# definitions, not `else`: the regorus RVM does not try an `else` after a failed `some ... in`.)
fast_value_ok(rules, name, value) if {
	some cs in rules.charsets[name]
	count(value) >= cs.min
	trim(value, cs.chars) == ""
}

fast_value_ok(rules, name, _) if "^(?:(?s).*)$" in rules.patterns[name]

fast_value_ok(rules, name, value) if {
	some p in rules.patterns[name]
	regex.match(p, value)
}
