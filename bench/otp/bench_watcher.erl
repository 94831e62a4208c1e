%% bench_watcher: the BEAM side of "edit a file, see it live".
%%
%% Erlang/OTP has no file-change notification built in (no inotify binding
%% in kernel/stdlib; the fs / inotify libraries are third-party and not in
%% Debian's erlang-base), so this gen_server polls, which is what the
%% common reloaders (mochiweb's reloader, sync, ...) do:
%%
%%   every PollMs ms (erlang:send_after/3 re-armed after each poll):
%%     file:read_file_info(File, [{time, posix}])
%%     if {mtime, size, inode} changed, or mtime is within the last 2 s
%%     (mtime has 1 s resolution, so an edit in the same second with the
%%     same size would otherwise be missed), read the file and compare its
%%     MD5 with the last compiled content;
%%     if the content changed:
%%       compile:file(File, [binary, return_errors])
%%       code:soft_purge(Mod)   (drop the previous old code; refuses if a
%%                               process still runs it, then we retry)
%%       code:load_binary(Mod, File, Bin)
%%
%% A compile error keeps the current code and is reported on stderr.
-module(bench_watcher).
-behaviour(gen_server).

-include_lib("kernel/include/file.hrl").

-export([start/2, stats/1, stop/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2,
         terminate/2, code_change/3]).

start(File, PollMs) ->
    gen_server:start(?MODULE, {File, PollMs}, []).

%% Returns #{reloads => [{CompileUs, LoadUs}], errors => N, polls => N}.
stats(Pid) -> gen_server:call(Pid, stats).

stop(Pid) -> gen_server:stop(Pid).

init({File, PollMs}) ->
    self() ! poll,
    {ok, #{file => File, poll_ms => PollMs, stat => undefined,
           md5 => undefined, reloads => [], errors => 0, polls => 0}}.

handle_call(stats, _From, #{reloads := R, errors := E, polls := P} = S) ->
    {reply, #{reloads => lists:reverse(R), errors => E, polls => P}, S};
handle_call(_Other, _From, S) ->
    {reply, {error, unknown_call}, S}.

handle_cast(_Msg, S) ->
    {noreply, S}.

handle_info(poll, #{poll_ms := PollMs, polls := P} = S) ->
    S1 = check(S#{polls := P + 1}),
    erlang:send_after(PollMs, self(), poll),
    {noreply, S1};
handle_info(_Msg, S) ->
    {noreply, S}.

terminate(_Reason, _S) ->
    ok.

code_change(_OldVsn, S, _Extra) ->
    {ok, S}.

%% ---------------------------------------------------------------------

check(#{file := File, stat := OldStat} = S) ->
    case file:read_file_info(File, [{time, posix}]) of
        {ok, #file_info{mtime = MTime, size = Size, inode = Inode}} ->
            Stat = {MTime, Size, Inode},
            Recent = erlang:system_time(second) - MTime =< 2,
            case Stat =/= OldStat orelse Recent of
                true -> maybe_reload(S#{stat := Stat});
                false -> S
            end;
        {error, _} ->
            S
    end.

maybe_reload(#{file := File, md5 := OldMd5} = S) ->
    case file:read_file(File) of
        {ok, Bin} ->
            case erlang:md5(Bin) of
                OldMd5 -> S;
                Md5 -> reload(Md5, S)
            end;
        {error, _} ->
            S
    end.

reload(Md5, #{file := File, reloads := R, errors := E} = S) ->
    T0 = erlang:monotonic_time(microsecond),
    case compile:file(File, [binary, return_errors]) of
        {ok, Mod, Beam} ->
            T1 = erlang:monotonic_time(microsecond),
            case code:soft_purge(Mod) of
                true ->
                    {module, Mod} = code:load_binary(Mod, File, Beam),
                    T2 = erlang:monotonic_time(microsecond),
                    S#{md5 := Md5, reloads := [{T1 - T0, T2 - T1} | R]};
                false ->
                    %% a process still runs the previous old code: retry
                    %% on the next poll (md5 left unchanged).
                    S
            end;
        {error, Errors, _Warnings} ->
            io:format(standard_error, "bench_watcher: compile error in ~s: ~p~n",
                      [File, Errors]),
            S#{md5 := Md5, errors := E + 1}
    end.
