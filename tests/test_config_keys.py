"""The two dotted-key views of a resolved config: settings as typed (resume and CLI checks) and leaves as stored
(table and sweep comparisons)."""

from fedprompt.config_keys import raw_keys, setting_keys

CONFIG = {"seed": 1, "fabric": {}, "method": {"class_path": "fedprompt.methods.FedOTP", "init_args": {"lr": 0.002}},
          "data": {"class_path": "fedprompt.data.Combined",
                   "init_args": {"targets": [{"class_path": "fedprompt.data.DTD", "init_args": {"seed": 3}}],
                                 "shots": [1, 2]}}}


def test_setting_keys_leave_out_init_args_and_keep_lists_whole():
    assert setting_keys(CONFIG) == {
        "seed": 1, "fabric": {}, "method": "fedprompt.methods.FedOTP", "method.lr": 0.002,
        "data": "fedprompt.data.Combined", "data.shots": [1, 2],
        "data.targets": [{"class_path": "fedprompt.data.DTD", "init_args": {"seed": 3}}]}


def test_raw_keys_keep_init_args_and_index_lists_of_mappings():
    assert raw_keys(CONFIG) == {
        "seed": 1, "method.class_path": "fedprompt.methods.FedOTP", "method.init_args.lr": 0.002,
        "data.class_path": "fedprompt.data.Combined", "data.init_args.shots": [1, 2],
        "data.init_args.targets.0.class_path": "fedprompt.data.DTD", "data.init_args.targets.0.init_args.seed": 3}
