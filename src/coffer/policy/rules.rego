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
# Coffer's engine first evaluates fast_CreateContainerRequest, fast_ExecProcessRequest and
# fast_RemoveContainerRequest with `input`
# set to a *view* of the request: the fields the rules above read, selected and reformatted in Python
# (nothing decided there) so that loading and checking them is cheap. A fast rule only ever allows,
# with [container name, state ops as [op, path, value] (a remove: [op, path])], and only with comparisons at least
# as strict as every check of its request rule; anything else (undefined, an error) makes the engine
# evaluate the request rule on the whole request, which explains a denial.
#
# Most of a request is compared as one *text*: the compact ASCII JSON of the selected fields (object
# keys in sorted order; non-ASCII and control characters escaped), with each '"' written as DEL
# (U+007F) -- a character ASCII JSON never holds, so the text is still one-to-one, and without
# backslashes it loads into the engine as a string without escapes. Equal texts are equal values.
# The expected texts are the same encoding of per-container constants that fast_constants computes
# once, when the engine loads the policy; the engine gives them back as data.coffer_engine.
#
# The *lines* of a string list L are [count(L), concat(",", sorted L)], made only when no string
# holds a comma (the text then has count(L) - 1 of them), so equal lines are equal sorted lists.
#
# CreateContainer view: name; container_id; flags [OCI.Process.NoNewPrivileges, OCI.Root.Readonly];
# MaskedPaths (OCI.Linux's, cut to its first entry when a list: only its being a non-empty list is
# read); Env, the [NAME, VALUE] pairs of OCI.Process.Env whose NAME the container's policy does not
# fix to one value (made only when every entry is a string NAME=VALUE with a non-empty NAME, none
# repeated; NAME ends at the first "="); and `fixed`, the text of the list [Args, Capabilities, Cwd
# (OCI.Process), Devices (OCI.Linux), Hooks (OCI), MountTypes, MountData, User (OCI.Process), image,
# pstate, fixed env], where fixed env is the values of the variables the container's policy fixes to
# one value (its fast_create env_fixed), in the order of their names, each null when absent; and where Capabilities is [Ambient, Bounding, Effective,
# Inheritable, Permitted], each set as its lines or "Bounding" when those are Bounding's (made only
# when each set is a list of strings without commas); MountTypes the lines of each mount's
# "destination type", and MountData {"destination type": [source, options sorted]} for each mount
# not of the standard type at its destination (made only when every mount is an object with a
# string destination and type, none holding a space or comma); User [AdditionalGids (sorted, without
# duplicates, when all integers), GID, UID]; pstate the state's entry for container_id ({} when it
# has none). A field the request lacks is null, as the request rule reads it.
#
# The expected `fixed` holds a shared volume's source, SHARED_DIR/<container id>-KIND-NAME, so it is
# given as the texts around each place the container id goes: the fast rule joins them with the
# request's container id, which it first requires to be made only of letters, digits, "-", "_" and
# "." (characters the text writes as themselves; no "/" or "~", so the id is its own JSON pointer).
#
# RemoveContainer view: container_id, and state (the state's entry for it; the view is made only when
# there is one). The fast rule allows what the request rule allows for a known container id: its
# removal from the state.
#
# ExecProcess view: state (the state's entry for container_id; the view is made only when there is
# one); Env {NAME: VALUE} (from process; made as the CreateContainer pairs, all variables); `fixed`, the text of [Args, Capabilities, Cwd, User (as above)]
# from process (null when absent, as the request rule reads them), then NoNewPrivileges when present
# (absent, it is the container's). The expected texts are one per allowed command and
# NoNewPrivileges an exec may give.
#
# The fast rules avoid what the regorus 0.13 RVM gets wrong: a failing nested `every` is ignored; an
# `else` after a failed `some ... in` is not tried; conflicting object keys are settled silently; and
# a variable bound by `every` (the key of `every k, v`, or the value of `every x in object.keys(o)`)
# is not bound where it is a reference's key (`data.m[k]` then holds for any key).

fast_CreateContainerRequest := [f.name, [["add", concat("", ["/containers/", id]), f.index]]] if {
	f := data.coffer_engine.create[input.name]
	id := input.container_id
	is_string(id)
	id != ""
	trim(id, "-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz") == ""
	input.fixed == concat(id, f.fixed)
	input.flags in f.flags
	masked := input.MaskedPaths
	is_array(masked)
	count(masked) > 0
	every nv in input.Env {
		fast_value_ok(f.env_values[nv[0]], nv[1])
	}
}

fast_ExecProcessRequest := [f.name, []] if {
	f := data.coffer_engine.exec[input.state]
	f.commands[input.fixed]
	env_fixed := f.env_fixed
	object.subset(env_fixed, object.filter(input.Env, env_fixed))
	every nv in [[name, value] | some name, value in object.remove(input.Env, env_fixed)] {
		fast_value_ok(f.env_values[nv[0]], nv[1])
	}
}

fast_RemoveContainerRequest := [name, [["remove", concat("", ["/containers/", id])]]] if {
	name := data.coffer_engine.names[input.state]
	id := input.container_id
	is_string(id)
	id != ""
	trim(id, "-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz") == ""
}

# [the policy's flag, the request's]: a flag the policy may require to be true (used by ep_fast).
fast_flag_ok := {[false, false], [false, true], [true, true]}

# A value the variable's rules admit, by its env_values entry (see fast_env_values). (Separate
# definitions, not `else`: the regorus RVM does not try an `else` after a failed `some ... in`.)
fast_value_ok(rules, value) if {
	count(value) >= rules.min
	count(trim(value, rules.chars)) <= rules.rest
}

fast_value_ok(rules, value) if rules.exact[value]

fast_value_ok(rules, value) if {
	some p in rules.patterns
	regex.match(p, value)
}

# The per-container constants of the fast paths (evaluated by the engine with the interpreter, once,
# when it loads the policy). `create` has an entry for each container name whose mounts and required
# environment the fast path can state (every policy mount's source exact or a shared volume, no
# destination repeated; one exact value for each required variable); `exec` has one entry per
# container, in container order (null for a container the fast path cannot state).
fast_constants := {
	"create": {name: fast_create(i) | some name, i in pd.container_index; fast_create(i)},
	"exec": [fast_exec(c) | some c in pd.containers],
	"names": [c.name | some c in pd.containers],
}

fast_create(i) := {
	"index": i,
	"name": c.name,
	"flags": [[nnp, ro] |
		some nnp in fast_flag_values(object.get(c, "no_new_privileges", false))
		some ro in fast_flag_values(object.get(c, "read_only_root", false))
	],
	"env_fixed": env_fixed,
	"env_values": fast_env_values(c),
	"fixed": [
		c.args,
		[fast_same(fast_lines([]), caps), caps, "Bounding", fast_same(fast_lines([]), caps), "Bounding"],
		c.working_dir,
		[],
		null,
		fast_lines(sort([concat(" ", [d, t]) |
			some d, t in object.union(pd.common.default_mounts, {pm.destination: pm.type | some pm in c.mounts})
		])),
		{concat(" ", [pm.destination, pm.type]): [fast_source(pm), pm.options] |
			some pm in c.mounts
			not pd.common.default_mounts[pm.destination] == pm.type
		},
		fast_user(c),
		c.image,
		{},
	],
} if {
	c := pd.containers[i]
	fast_sets_ok(c)
	count({pm.destination | some pm in c.mounts}) == count(c.mounts)
	every pm in c.mounts {
		fast_mount_ok(pm)
	}
	every cap in c.capabilities {
		is_string(cap)
		cap_name(cap) == cap
	}
	caps := fast_lines(c.capabilities)
	env_fixed := fast_env_fixed(c)
	count(env_fixed) == count({n | some n in c.env.required})
}

# A string list as the view writes it: its lines (see the view).
fast_lines(strings) := [count(strings), concat(",", strings)]

# A capability set as the view writes it: "Bounding" when its lines are Bounding's.
fast_same(lines, bounding) := "Bounding" if lines == bounding

else := lines

# The constants that the request rules compare as sets are lists, so that equal lists are equal
# sets (capabilities are also checked above to be written as the rules normalise them).
fast_sets_ok(c) if {
	is_array(c.capabilities)
	is_array(c.user.additional_gids)
}

fast_user(c) := [c.user.additional_gids, c.user.gid, c.user.uid]

# {NAME: VALUE} for each required variable that has one exact value: the only value it may have.
fast_env_fixed(c) := {n: v |
	some n in c.env.required
	values := fast_exact_values(c, n)
	count(values) == 1
	v := values[0]
}

# NAME's exact values: VALUE for each exact entry NAME=VALUE.
fast_exact_values(c, n) := [v |
	prefix := concat("", [n, "="])
	some e, _ in c.env.exact
	startswith(e, prefix)
	v := substring(e, count(prefix), -1)
	c.env.exact[concat("", [prefix, v])]
]

# {NAME: the values NAME's rules admit} for each variable the rules name: "exact" {VALUE: true},
# "patterns" (anchored regexes) and, when the patterns admit any value or one of them is one
# character class repeated (a `charsets` entry), a shortcut {"chars", "min", "rest"}: a value is
# admitted when it has at least min characters, and at most rest once those in chars are trimmed from
# both ends. For "any value": min 0, chars "", rest unbounded; for a charset: rest 0 (all characters
# from chars), as the charset states the pattern's set without a regex.
fast_env_values(c) := {n: object.union(
	{"exact": {v: true | some v in fast_exact_values(c, n)}, "patterns": patterns},
	fast_env_shortcut(patterns, object.get(c.env.charsets, n, [])),
) |
	some n, _ in c.env.names
	patterns := object.get(c.env.patterns, n, [])
}

fast_env_shortcut(patterns, charsets) := {"chars": "", "min": 0, "rest": 9007199254740991} if "^(?:(?s).*)$" in patterns

else := {"chars": charsets[0].chars, "min": charsets[0].min, "rest": 0} if {
	is_string(charsets[0].chars)
	is_number(charsets[0].min)
}

else := {}

# A policy mount the fast path can state: of the standard type at its destination (then any source
# and options are allowed), or with a source fast_source states and options sorted as the rules sort.
fast_mount_ok(pm) if pd.common.default_mounts[pm.destination] == pm.type

fast_mount_ok(pm) if {
	not pd.common.default_mounts[pm.destination] == pm.type
	fast_source(pm)
	pm.options == sort(pm.options)
}

# A policy mount's source as the fast path admits it: exact, or for a shared volume {"prefix",
# "suffix"} around the container id.
fast_source(pm) := pm.source_exact if is_string(pm.source_exact)

fast_source(pm) := {"prefix": pm.source_prefix, "suffix": pm.source_suffix} if {
	not pm.source_exact
	is_string(pm.source_prefix)
	is_string(pm.source_suffix)
}

# The values of a flag the policy may require to be true, that the fast path accepts (null: absent).
fast_flag_values(required) := [true] if required

fast_flag_values(required) := [true, false, null] if required == false

fast_exec(c) := entry if {
	fast_sets_ok(c)
	entry := {"name": c.name, "env_fixed": fast_env_fixed(c), "env_values": fast_env_values(c),
		"commands": [array.concat([args, null, c.working_dir, fast_user(c)], nnp) |
		some args in c.allow.exec
		some nnp in fast_exec_nnp(object.get(c, "no_new_privileges", false))
	]}
} else := null

# NoNewPrivileges as an exec may give it: absent (the container's), true, or false when the policy
# does not require it.
fast_exec_nnp(required) := [[], [true]] if required

fast_exec_nnp(required) := [[], [true], [false]] if required == false
